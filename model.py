"""
model.py - the one shared module: class-conditional UNet, noise schedule, samplers, checkpoints.

    from model import build_unet, make_schedule, add_noise, sample, save_checkpoint, load_checkpoint
    unet = build_unet(image_size=256, preset="base")             # 1x256x256, ~114M parameters
    alpha_bar = make_schedule().alphas_cumprod                      # (1000,)
    xt = add_noise(x0, eps, t, alpha_bar)                           # the forward process q(xt | x0)
    x0 = sample(unet, labels, sampler="ddim-2m", steps=25, guidance=1.25)  # (B, 1, H, W) in [-1, 1]

Everything else (train.py, sample.py, evaluate.py, bench.py) imports from here and nowhere else.
"""
import argparse
import json
import math
import os
import pickle
import shutil
import time
import zipfile

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

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
AUTO = {32: "tiny", 64: "tiny", 128: "small"}  # --preset auto: image size -> preset (larger: base); measured (README)


def pick_preset(preset, image_size):
    return AUTO.get(image_size, "base") if preset == "auto" else preset


def build_unet(image_size=256, preset="auto"):
    preset = pick_preset(preset, image_size)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from auto, {', '.join(PRESETS)}")
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
# The noise schedule (Ho et al. 2020): 1000 steps, betas linear from 1e-4 to 0.02. The model predicts eps, or
# v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022). --shift s > 1 makes every step noisier,
# SNR(t) -> SNR(t) / s^2 (Hoogeboom et al. 2023): a larger image keeps its layout visible at a given SNR, since
# neighbouring pixels average the noise away, so the same schedule spends fewer steps on the layout.
PREDICTIONS = ("epsilon", "v_prediction")  # diffusers' names


def make_schedule(prediction="epsilon", shift=1.0):
    kw = dict(num_train_timesteps=NUM_TIMESTEPS, prediction_type=prediction, clip_sample=True)
    linear = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, **kw)
    if shift == 1.0:
        return linear
    snr = linear.alphas_cumprod.double() / (1 - linear.alphas_cumprod.double()) / shift ** 2
    alpha_bar = snr / (1 + snr)  # (1000,) shifted
    betas = 1 - alpha_bar / torch.cat([torch.ones(1, dtype=alpha_bar.dtype), alpha_bar[:-1]])
    return DDPMScheduler(trained_betas=betas.tolist(), **kw)  # a diffusers config as any other: loadable, exportable


def schedule_of(ckpt):
    """The schedule a checkpoint was trained on (checkpoints before v-prediction: eps, linear)."""
    return make_schedule(**ckpt.get("schedule", {}))


def add_noise(x0, eps, t, alpha_bar):
    """Forward process: xt = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps.  x0, eps: (B, 1, H, W); t: (B,)"""
    a = alpha_bar.to(x0.device)[t].view(-1, 1, 1, 1).to(x0.dtype)  # (B, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def target(x0, eps, t, alpha_bar, prediction="v_prediction"):
    """What the UNet learns to output: eps, or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0."""
    if prediction == "epsilon":
        return eps
    a = alpha_bar.to(x0.device)[t].view(-1, 1, 1, 1).to(x0.dtype)  # (B, 1, 1, 1)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def loss_weights(alpha_bar, prediction="v_prediction", loss="mse", gamma=5.0):  # the defaults are train.py's
    """(1000,) weight of each t in the MSE. In x0 units an eps-MSE weighs t by SNR and a v-MSE by SNR + 1;
    Min-SNR-gamma (Hang et al. 2023) makes that min(SNR, gamma) for either, so the easy low-noise steps
    (SNR = alpha_bar / (1 - alpha_bar), 1e4 at t=0) do not pull the shared weights their way; mse weighs all t the same."""
    snr = alpha_bar / (1 - alpha_bar)
    if loss == "mse":
        return torch.ones_like(snr)
    return snr.clamp(max=gamma) / (snr if prediction == "epsilon" else snr + 1)

# -----------------------------------------------------------------------------
# Samplers. The diffusers ones are built from the training schedule's config, so they share its betas; ddim-2m is
# written out below. All run in the one loop of sample(). ddpm is the ancestral 1000-step sampler; the others are
# deterministic fast solvers.

SAMPLERS = {  # "trailing" spacing: the first step starts at t=999, pure noise, whatever the step count (Lin et al. 2023)
    "ddim-2m": None,  # hand-written in sample(): DDIM's update, second order, even steps + a fine tail
    "ddpm": lambda cfg: DDPMScheduler.from_config(cfg, timestep_spacing="trailing"),
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg, timestep_spacing="trailing"),
    # pixel-space models need the predicted x0 kept in [-1, 1], as ddpm/ddim's clip_sample does; without it a
    # few-step solver can run away to saturated noise
    "dpm++": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                                 thresholding=True, sample_max_value=1.0),
}
DEFAULT_STEPS = {"ddim-2m": 25, "ddpm": 1000, "ddim": 50, "dpm++": 25}
TAIL = (24, 10, 3)  # ddim-2m's last steps; above them its steps are even in t, as ddim's "trailing" ones (README)


def make_sampler(name, steps, schedule=None):
    """-> (diffusers scheduler or None for ddim-2m, timesteps (steps,) long, high noise first). sample() hands every
    scheduler eps, so they are built on the eps version of the training schedule (make_schedule() if None)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    most = NUM_TIMESTEPS - 2 * TAIL[0] + len(TAIL) if SAMPLERS[name] is None else NUM_TIMESTEPS  # ddim-2m: 955
    if not 1 <= steps <= most:
        raise ValueError(f"--steps {steps}: {name} takes between 1 and {most}")
    if SAMPLERS[name] is None:  # even steps from t=999 down to 48, then the tail, where fine detail forms: the even
        # grid alone jumps from t=39 straight to the clean image and blurs it; Karras et al.'s rho-7 levels (the tail's
        # source) crowd 8 of 25 steps above t=800 instead, and a briefly trained model then draws worse than ddim
        tail = TAIL[len(TAIL) - min(len(TAIL), steps - 1):]  # 1 step: no tail
        head = torch.linspace(NUM_TIMESTEPS - 1, 2 * TAIL[0], steps - len(tail), dtype=torch.float64).round().long()
        return None, torch.cat([head, torch.tensor(tail, dtype=torch.long)])
    scheduler = SAMPLERS[name]({**(schedule or make_schedule()).config, "prediction_type": "epsilon"})
    scheduler.set_timesteps(steps)
    return scheduler, scheduler.timesteps


@torch.no_grad()
def sample(model, labels, sampler="ddim-2m", steps=25, guidance=1.0, generators=None, schedule=None):
    """Generate one image per label. labels: (B,) long on the model's device.
    generators: one torch.Generator (CPU) per image, so image i depends only on its own seed, never on the batch.
    schedule: the one the model was trained on (schedule_of(ckpt); default make_schedule()).
    Returns (B, 1, H, W) float32 in [-1, 1]."""
    device, size, schedule = labels.device, model.config.sample_size, schedule or make_schedule()
    scheduler, timesteps = make_sampler(sampler, steps, schedule)
    generators = generators or [torch.Generator().manual_seed(i) for i in range(len(labels))]
    xt = torch.cat([torch.randn(1, 1, size, size, generator=g) for g in generators]).to(device)  # (B, 1, H, W)
    null = torch.full_like(labels, NULL_CLASS)
    extra = {"generator": generators} if sampler == "ddpm" else {}  # only ddpm adds fresh noise each step
    alpha_bar, v = schedule.alphas_cumprod.tolist(), schedule.config.prediction_type == "v_prediction"
    lam = lambda t: 0.5 * math.log(alpha_bar[t] / (1 - alpha_bar[t]))  # log signal-to-noise ratio of xt, per 2
    x0_prev = None
    for i, t in enumerate(timesteps.tolist()):
        x_in = xt if scheduler is None else scheduler.scale_model_input(xt, t)
        if guidance == 1.0:  # plain conditional model: one forward, no doubled batch
            out = model(x_in, t, class_labels=labels).sample.float()  # eps or v
        else:  # classifier-free guidance: cond and null in one batched forward
            out_cond, out_null = model(torch.cat([x_in, x_in]), t, class_labels=torch.cat([labels, null])).sample.float().chunk(2)
            out = out_null + guidance * (out_cond - out_null)  # linear in the output: the same for eps and v
        eps = math.sqrt(1 - alpha_bar[t]) * xt + math.sqrt(alpha_bar[t]) * out if v else out  # v -> eps
        if scheduler is not None:
            xt = scheduler.step(eps, t, xt, **extra).prev_sample
            continue
        # ddim-2m. DDIM's step from t to s: x0 = clip((xt - sqrt(1 - a_t) eps) / sqrt(a_t)), xs = sqrt(a_s) x0 +
        # sqrt(1 - a_s) eps. It keeps the model's eps for the noise part: the x0 of an eps model is its error times 157
        # at t=999, and samplers built on the clipped x0 alone (dpm++, UniPC) turn that into noise. Second order as
        # DPM-Solver++(2M) (Lu et al. 2022): the x0 part gets the extrapolation from the last two x0, which are clipped
        # and smooth (extrapolating eps instead adds grain that feeds on itself over many steps)
        s = timesteps[i + 1].item() if i + 1 < len(timesteps) else -1  # -1: the clean image, alpha_bar = 1
        a_t, a_s = alpha_bar[t], (alpha_bar[s] if s >= 0 else 1.0)
        x0 = ((xt - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
        x_s = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
        if x0_prev is not None and s >= 0:  # the last step, to the clean image, stays first order
            h, h_prev = lam(s) - lam(t), lam(t) - lam(t_prev)
            x_s = x_s + math.sqrt(a_s) * (1 - math.exp(-h)) * h / (2 * h_prev) * (x0 - x0_prev)
        xt, x0_prev, t_prev = x_s, x0, t
    return xt.clamp(-1, 1)

# -----------------------------------------------------------------------------
# Command lines: every script's --help shows the defaults, except where there is none to show.


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


# -----------------------------------------------------------------------------
# CPU threads. PyTorch starts one OpenMP thread per core; when another program holds a core, those threads wait on
# each other at every op and a run goes many times slower (measured 9x on 2 cores). So count the idle cores.


def free_cores(seconds=0.25):
    """Cores idle over the next `seconds` (Linux /proc/stat; elsewhere all of them), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        def busy_idle():
            with open("/proc/stat") as f:
                v = [int(n) for n in f.readline().split()[1:]]  # user nice system idle iowait irq softirq steal ...
            return sum(v) - v[3] - v[4], v[3] + v[4]
        (b0, i0), _, (b1, i1) = busy_idle(), time.sleep(seconds), busy_idle()
        idle_share = (i1 - i0) / max(1, (b1 - b0) + (i1 - i0))
        return max(1, min(cores, round(idle_share * (os.cpu_count() or cores))))
    except (OSError, ValueError, IndexError):
        return cores


def set_threads(device):
    """CPU work: as many threads as free cores, unless the user set OMP_NUM_THREADS. Returns the thread count."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(free_cores())
    return torch.get_num_threads()


def auto_amp(device):
    """Autocast for train.py --amp auto, sample.py and bench.py: bf16 where the GPU has bf16 tensor cores (compute
    capability >= 8.0: Ampere on; ROCm), else fp16 (train.py adds a GradScaler); fp32 ("off") on the CPU. Not
    torch.cuda.is_bf16_supported(): it is also true where bf16 is only emulated (V100, T4), much slower than fp16
    there, and its including_emulation=False is not in every torch we support."""
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.version.hip or torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


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

DEFAULT_SAMPLER = "ddim-2m"  # sample.py's defaults, chosen by measurement (README)
DEFAULT_GUIDANCE = 1.25  # classifier-free guidance scale
CARD_SAMPLER = "ddim"  # the card's plain-diffusers loop: ddim-2m's first-order part, a diffusers scheduler
EXPORT = ("unet", "scheduler", "README.md")

CARD = """---
library_name: diffusers
tags: [medical-imaging, chest-x-ray, synthetic-data, ddpm]
---
# Synthetic chest X-rays: a class-conditional DDPM ({size}x{size}, grayscale)

**Synthetic images, not patient images. Not for diagnosis** or any clinical decision. Mark every image you save
or share as synthetic (the code below writes `synthetic=1` into the PNG).

- `unet/`: diffusers `UNet2DModel`, 1 channel in and out, {size}x{size} px, predicts {predicts}.
- `scheduler/`: `{cls}` ("{sampler}") on the training schedule: {T} steps, {schedule}, timestep spacing
  "{spacing}", prediction_type "{prediction}". Any diffusers scheduler can be built from its config with `from_config`.
- Pixels: the model works in [-1, 1]; 8-bit gray = round((x + 1) * 127.5).
- Sampling: {steps} steps, classifier-free guidance w = {w}: out = out_null + w (out_cond - out_null). The project's
  own sampler, ddim-2m, adds a second-order term to this DDIM step and needs about half the steps.
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
        out_cond, out_null = unet(x_in, t, class_labels=labels).sample.chunk(2)  # {what}
        x = scheduler.step(out_null + w * (out_cond - out_null), t, x{gen}).prev_sample
gray = ((x.clamp(-1, 1)[0, 0] + 1) * 127.5).round().byte().numpy()  # (H, W) uint8
info = PngImagePlugin.PngInfo()
info.add_text("synthetic", "1")
Image.fromarray(gray).save(f"synthetic_class{{y}}_seed{{seed}}.png", pnginfo=info)
```
"""


def export_pretrained(model, out_dir, schedule=None):
    """Write out_dir/unet, out_dir/scheduler, out_dir/README.md (replacing them); other files in out_dir are kept."""
    tmp = os.path.join(out_dir, "export.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left behind by a crash mid-export
    model.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
    scheduler = SAMPLERS[CARD_SAMPLER]((schedule or make_schedule()).config)
    # write every value: diffusers re-reads the ones it marks as defaults from whatever version loads the file
    scheduler = type(scheduler).from_config({k: v for k, v in scheduler.config.items() if k != "_use_default_values"})
    scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
    c, y, rows = scheduler.config, min(3, len(CLASSES) - 1), "\n".join(f"| {i} | {n} |" for i, n in enumerate(CLASSES))
    card = CARD.format(size=model.config.sample_size, cls=type(scheduler).__name__, sampler=CARD_SAMPLER,
                       T=c.num_train_timesteps, spacing=c.timestep_spacing, prediction=c.prediction_type,
                       schedule=f"betas linear {c.beta_start} to {c.beta_end}" if c.trained_betas is None else
                       "betas in `trained_betas` (linear 1e-4 to 0.02, shifted to lower SNR)",
                       what="eps" if c.prediction_type == "epsilon" else "v",
                       predicts="the noise eps" if c.prediction_type == "epsilon" else
                       "v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0; the scheduler takes it as it is", steps=DEFAULT_STEPS[CARD_SAMPLER], w=DEFAULT_GUIDANCE,
                       null=NULL_CLASS, y=y, y_name=CLASSES[y], rows=rows,
                       gen=", generator=g" if CARD_SAMPLER == "ddpm" else "")  # only ddpm adds noise each step
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(card)
    for name in EXPORT:  # each renamed into place whole, so a reader never sees half a unet/
        if os.path.isdir(os.path.join(out_dir, name)):
            shutil.rmtree(os.path.join(out_dir, name))
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)
