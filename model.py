"""
model.py - the one shared module: class-conditional UNet, noise schedule, samplers, checkpoints.

    from model import build_unet, make_schedule, add_noise, sample, save_checkpoint, load_checkpoint
    unet = build_unet(image_size=256, preset="base")             # 1x256x256, ~114M parameters
    alpha_bar = make_schedule().alphas_cumprod                      # (1000,)
    xt = add_noise(x0, eps, t, alpha_bar)                           # the forward process q(xt | x0)
    x0 = sample(unet, labels, sampler="dpm++", steps=25, guidance=2.0)   # (B, 1, H, W) in [-1, 1]

Everything else (train.py, sample.py, evaluate.py, bench.py) imports from here and nowhere else.
"""
import json
import os
import pickle
import shutil
import zipfile

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel,
                       UniPCMultistepScheduler)

CLASSES = ["No Finding", "Atelectasis", "Cardiomegaly", "Effusion", "Pneumonia", "Pneumothorax"]
NULL_CLASS = len(CLASSES)  # extra embedding for "no label": classifier-free guidance trains and samples with it
NUM_TIMESTEPS = 1000

# -----------------------------------------------------------------------------
# The UNet: diffusers' UNet2DModel, 1 channel in and out, a learned embedding per class (+ the null class)
# added to the timestep embedding. Attention sits at the 16x16 level (where it is affordable and the
# receptive field is global) and in the middle block.

PRESETS = {
    # name:  (channels per resolution level, resnet layers per level, GroupNorm groups)
    "base":  ((128, 128, 256, 256, 512, 512), 2, 32),  # the standard diffusers 256x256 DDPM UNet, ~114M
    "small": ((32, 64, 128, 256), 2, 16),             # 32-128 px research runs, ~14M
    "tiny":  ((16, 32, 32), 1, 8),                    # CPU tests, <1M, a training step in milliseconds
}
MIN_BOTTOM = 4  # the lowest resolution level must keep at least 4x4 pixels


def build_unet(image_size=256, preset="base"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    channels, layers, groups = PRESETS[preset]
    bottom = image_size // 2 ** (len(channels) - 1)
    if image_size < 32 or image_size & (image_size - 1) or bottom < MIN_BOTTOM:
        smallest = max(32, MIN_BOTTOM * 2 ** (len(channels) - 1))
        raise ValueError(f"image size {image_size} does not fit preset {preset!r}: "
                         f"use a power of two >= {smallest}")
    resolutions = [image_size // 2 ** i for i in range(len(channels))]
    attn = [r == 16 for r in resolutions]
    return UNet2DModel(
        sample_size=image_size, in_channels=1, out_channels=1,
        block_out_channels=channels, layers_per_block=layers, norm_num_groups=groups,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        num_class_embeds=NULL_CLASS + 1,
    )


def flops_per_image(model, image_size):
    """Forward-pass FLOPs for one image (a multiply-add counts 2), counted on the meta device: no memory, no time."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        unet = UNet2DModel.from_config(model.config)
        x = torch.zeros(1, 1, image_size, image_size)
        t, y = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, class_labels=y)
    return counter.get_total_flops()

# -----------------------------------------------------------------------------
# The noise schedule (Ho et al. 2020): 1000 steps, betas linear from 1e-4 to 0.02, the model predicts eps.


def make_schedule():
    return DDPMScheduler(num_train_timesteps=NUM_TIMESTEPS, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, prediction_type="epsilon", clip_sample=True)


def add_noise(x0, eps, t, alpha_bar):
    """Forward process: xt = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps.  x0, eps: (B, 1, H, W); t: (B,)"""
    a = alpha_bar.to(x0.device)[t].view(-1, 1, 1, 1).to(x0.dtype)  # (B, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps

# -----------------------------------------------------------------------------
# Samplers. All are built from the training schedule's config, so they share its betas, and all run in
# the one loop below. ddpm is the ancestral 1000-step sampler; the others are deterministic fast solvers.

SAMPLERS = {  # "trailing" spacing: the first step starts at t=999, pure noise, whatever the step count (Lin et al. 2023)
    "ddpm": lambda cfg: DDPMScheduler.from_config(cfg, timestep_spacing="trailing"),
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg, timestep_spacing="trailing"),
    # pixel-space models need the predicted x0 kept in [-1, 1], as ddpm/ddim's clip_sample does; without it a
    # few-step solver can run away to saturated noise
    "dpm++": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                                 thresholding=True, sample_max_value=1.0),
    "unipc": lambda cfg: UniPCMultistepScheduler.from_config(cfg, thresholding=True, sample_max_value=1.0),
}
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpm++": 25, "unipc": 25}


def make_sampler(name, steps):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    if not 1 <= steps <= NUM_TIMESTEPS:
        raise ValueError(f"--steps {steps}: must be between 1 and {NUM_TIMESTEPS}")
    scheduler = SAMPLERS[name](make_schedule().config)
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def sample(model, labels, sampler="dpm++", steps=25, guidance=1.0, generators=None, interval=(0, NUM_TIMESTEPS - 1)):
    """Generate one image per label. labels: (B,) long on the model's device.
    generators: one torch.Generator (CPU) per image, so image i depends only on its own seed, never on the batch.
    interval: guidance applies only at timesteps lo <= t <= hi (Kynkaanniemi et al. 2024); elsewhere w = 1.
    Returns (B, 1, H, W) float32 in [-1, 1]."""
    device, size = labels.device, model.config.sample_size
    scheduler = make_sampler(sampler, steps)
    generators = generators or [torch.Generator().manual_seed(i) for i in range(len(labels))]
    xt = torch.cat([torch.randn(1, 1, size, size, generator=g) for g in generators]).to(device)  # (B, 1, H, W)
    xt = xt * scheduler.init_noise_sigma
    null = torch.full_like(labels, NULL_CLASS)
    extra = {"generator": generators} if sampler == "ddpm" else {}  # only ddpm adds fresh noise each step
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(xt, t)
        if guidance == 1.0 or not interval[0] <= t <= interval[1]:  # plain conditional model: one forward
            eps = model(x_in, t, class_labels=labels).sample.float()
        else:  # classifier-free guidance: cond and null in one batched forward
            eps_cond, eps_null = model(torch.cat([x_in, x_in]), t, class_labels=torch.cat([labels, null])).sample.float().chunk(2)
            eps = eps_null + guidance * (eps_cond - eps_null)
        xt = scheduler.step(eps, t, xt, **extra).prev_sample
    return xt.clamp(-1, 1)

# -----------------------------------------------------------------------------
# Checkpoints: one file of plain tensors and Python types, so torch.load(weights_only=True) reads it and
# no code inside a file a user was handed ever runs. Keys written by train.py:
#   model, ema (state dicts), optimizer, scaler, step, unet_config, classes, image_size, args, rng


def save_checkpoint(path, ckpt):
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a half-written ckpt.pt


def load_checkpoint(path, map_location="cpu"):
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint")
    if not zipfile.is_zipfile(path):  # every torch.save since 1.6 writes a zip archive
        raise ValueError(f"{path}: not a readable checkpoint (not a torch.save archive)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses any pickled object that is not plain data
        raise ValueError(f"{path}: refused: not a plain-tensor checkpoint, it asks to unpickle objects "
                         f"({str(e).splitlines()[-1][:120]})") from None
    except Exception as e:  # truncated or corrupt archive
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(ckpt, dict) or not {"unet_config", "classes", "image_size"} <= ckpt.keys():
        raise ValueError(f"{path}: not a checkpoint of this project (no unet_config/classes/image_size)")
    return ckpt


def unet_config(model):
    """The UNet's config as plain JSON types (diffusers' FrozenDict is not weights_only-loadable)."""
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


def unet_from_checkpoint(ckpt, ema=True):
    model = UNet2DModel.from_config(ckpt["unet_config"])
    model.load_state_dict(ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"])
    return model.eval()


# -----------------------------------------------------------------------------
# Export: unet/ (the EMA weights), scheduler/ (the default sampler on the training schedule) and README.md (the model
# card) in the run folder: a model that diffusers alone loads and samples. The card states the defaults below.

DEFAULT_SAMPLER = "dpm++"  # sample.py's defaults
DEFAULT_GUIDANCE = 2.0  # classifier-free guidance: best label fidelity and per-class realism of w in {1, 2, 4} (README)
EXPORT = ("unet", "scheduler", "README.md")

CARD = """---
library_name: diffusers
tags: [medical-imaging, chest-x-ray, synthetic-data, ddpm]
---
# Synthetic chest X-rays: a class-conditional DDPM ({size}x{size}, grayscale)

**Synthetic images, not patient images. Not for diagnosis** or any clinical decision. Mark every image you save
or share as synthetic (the code below writes `synthetic=1` into the PNG).

- `unet/`: diffusers `UNet2DModel`, 1 channel in and out, {size}x{size} px, predicts the noise eps.
- `scheduler/`: `{cls}` ("{sampler}") on the training schedule: {T} steps, {schedule} betas {beta_start} to
  {beta_end}, timestep spacing "{spacing}". Any diffusers scheduler can be built from its config with `from_config`.
- Pixels: the model works in [-1, 1]; 8-bit gray = round((x + 1) * 127.5).
- Default sampling: {steps} steps, classifier-free guidance w = {w}: eps = eps_null + w (eps_cond - eps_null).
- `unet/`, `scheduler/` and this card are the model; nothing else in this folder is needed to sample.

| class_labels | class |
|---|---|
{rows}
| {null} | null label: the unconditional model, for classifier-free guidance |

```python
import torch
from diffusers import UNet2DModel, {cls}
from PIL import Image, PngImagePlugin

folder, y, w, seed = ".", {y}, {w}, 0  # this folder; class {y} = {y_name}; guidance scale; noise seed
unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
scheduler = {cls}.from_pretrained(folder, subfolder="scheduler")
scheduler.set_timesteps({steps})
size, g, labels = unet.config.sample_size, torch.Generator().manual_seed(seed), torch.tensor([y, {null}])
x = torch.randn(1, 1, size, size, generator=g) * scheduler.init_noise_sigma  # (1, 1, H, W): pure noise
with torch.no_grad():
    for t in scheduler.timesteps:  # the class and the null label in one batch of 2
        x_in = scheduler.scale_model_input(x, t).repeat(2, 1, 1, 1)
        eps_cond, eps_null = unet(x_in, t, class_labels=labels).sample.chunk(2)
        x = scheduler.step(eps_null + w * (eps_cond - eps_null), t, x{gen}).prev_sample
gray = ((x.clamp(-1, 1)[0, 0] + 1) * 127.5).round().byte().numpy()  # (H, W) uint8
info = PngImagePlugin.PngInfo()
info.add_text("synthetic", "1")
Image.fromarray(gray).save(f"synthetic_class{{y}}_seed{{seed}}.png", pnginfo=info)
```
"""


def export_pretrained(model, out_dir):
    """Write out_dir/unet, out_dir/scheduler, out_dir/README.md (replacing them); other files in out_dir are kept."""
    tmp = os.path.join(out_dir, "export.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left behind by a crash mid-export
    model.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
    scheduler = SAMPLERS[DEFAULT_SAMPLER](make_schedule().config)
    # write every value: diffusers re-reads the ones it marks as defaults from whatever version loads the file
    scheduler = type(scheduler).from_config({k: v for k, v in scheduler.config.items() if k != "_use_default_values"})
    scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
    c, y, rows = scheduler.config, min(3, len(CLASSES) - 1), "\n".join(f"| {i} | {n} |" for i, n in enumerate(CLASSES))
    card = CARD.format(size=model.config.sample_size, cls=type(scheduler).__name__, sampler=DEFAULT_SAMPLER,
                       T=c.num_train_timesteps, schedule=c.beta_schedule, beta_start=c.beta_start, beta_end=c.beta_end,
                       spacing=c.timestep_spacing, steps=DEFAULT_STEPS[DEFAULT_SAMPLER], w=DEFAULT_GUIDANCE,
                       null=NULL_CLASS, y=y, y_name=CLASSES[y], rows=rows,
                       gen=", generator=g" if DEFAULT_SAMPLER == "ddpm" else "")  # only ddpm adds noise each step
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(card)
    for name in EXPORT:  # each renamed into place whole, so a reader never sees half a unet/
        if os.path.isdir(os.path.join(out_dir, name)):
            shutil.rmtree(os.path.join(out_dir, name))
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)
