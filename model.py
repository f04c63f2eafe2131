"""
model.py - the module every script imports: class-conditional UNet, noise schedule, samplers, checkpoints.

    unet = build_unet(image_size=256, preset="base")                       # 1x256x256, ~114M parameters
    xt = add_noise(x0, eps, t, make_schedule().alphas_cumprod)             # the forward process q(xt | x0)
    x0 = sample(unet, labels, sampler="ddim-2m", steps=25, guidance=1.25)  # (B, 1, H, W) in [-1, 1]
"""
import argparse
import json
import math
import os
import pickle
import sys
import zipfile

import numpy as np
import torch  # diffusers is imported where it is used: 2-3 s that --help, a mistyped flag and
# evaluate.py (which needs no UNet of ours) would otherwise wait for at every start

CLASSES = ["No Finding", "Atelectasis", "Cardiomegaly", "Effusion", "Pneumonia", "Pneumothorax"]  # NIH's six: the
# classes of a prepared folder or a checkpoint that names none (from before prepare_data.py --classes); see classes_of
NUM_TIMESTEPS = 1000

# -----------------------------------------------------------------------------
# The UNet: diffusers' UNet2DModel, 1 channel in and out, a learned embedding per class added to the timestep
# embedding, and one more, the null class ("no label", = the number of classes), that classifier-free guidance
# trains and samples with. Attention at the 16x16 level (affordable there, and global) and in the middle block.
# Multi-label (prepare_data.py --labels multi): a learned vector per finding, summed over the film's findings
# (No Finding: none, the zero vector), and the null label's vector; labels are (B, F + 1) 0/1, the last column null.

PRESETS = {  # name: (channels per resolution level, resnet layers per level, GroupNorm groups)
    "base":  ((128, 128, 256, 256, 512, 512), 2, 32),  # the standard diffusers 256x256 DDPM UNet, ~114M
    "small": ((32, 64, 128, 256), 2, 16),             # 32-128 px research runs, ~14M
    "tiny4": ((16, 32, 32, 64), 1, 8),                # tiny + an 8x8 level: at 64 px 2% slower, half the seed's
                                                      # spread in fine texture (docs/results.md)
    "tiny":  ((16, 32, 32), 1, 8),                    # CPU tests, <1M, a training step in milliseconds
}
AUTO = {32: "tiny", 64: "tiny4", 128: "small"}  # --preset auto: size -> preset (larger: base); docs/results.md
CLASS_STD = 0.3  # class vectors start N(0, 0.3^2), not diffusers' N(0, 1): a vector 7x the timestep embedding's
# size (tiny) is answered with speckle when its class is in one batch in twenty; 0 learns every class slower


def pick_preset(preset, image_size):
    return AUTO.get(image_size, "base") if preset == "auto" else preset


class MultiHotEmbedding(torch.nn.Embedding):
    """(B, F + 1) 0/1 -> (B, D): the sum of the vectors of the findings set (the last one: the null label). The weight
    is nn.Embedding's, so the export loads as a plain UNet2DModel (its model card shows the sum)."""
    def forward(self, y):
        return y.to(self.weight.dtype) @ self.weight


def multi_hot(unet):  # swap the class embedding for the summed one, same weight (B, F + 1) -> (B, D); returns unet
    e = unet.class_embedding
    unet.class_embedding = MultiHotEmbedding(e.num_embeddings, e.embedding_dim, _weight=e.weight.data)
    return unet


def build_unet(image_size=256, preset="auto", num_classes=len(CLASSES), multi_label=False):
    preset = pick_preset(preset, image_size)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from auto, {', '.join(PRESETS)}")
    from diffusers import UNet2DModel
    channels, layers, groups = PRESETS[preset]
    smallest = max(32, 4 * 2 ** (len(channels) - 1))  # the lowest level keeps at least 4x4 pixels
    if image_size < smallest or image_size & (image_size - 1):
        raise ValueError(f"image size {image_size} does not fit preset {preset!r}: use a power of two >= {smallest}")
    attn = [image_size // 2 ** i == 16 for i in range(len(channels))]
    unet = UNet2DModel(sample_size=image_size, in_channels=1, out_channels=1, block_out_channels=channels,
                       layers_per_block=layers, norm_num_groups=groups, num_class_embeds=num_classes + 1,
                       down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                       up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)))
    torch.nn.init.normal_(unet.class_embedding.weight, std=CLASS_STD)  # (C + 1, D); docs/results.md, rare classes
    return multi_hot(unet) if multi_label else unet


def null_label(unet):  # the class id that means "no label": the last class embedding
    return unet.config.num_class_embeds - 1


def null_labels(unet, labels):  # labels (B,) or (B, F + 1) -> the null label in the same form
    if labels.ndim == 1:
        return torch.full_like(labels, null_label(unet))
    null = torch.zeros_like(labels)
    null[:, null_label(unet)] = 1  # the null label's column alone: not No Finding, which sets none
    return null


def prepared(data_dir, key, default):  # a setting a prepare_data.py folder records in prepare.json, else default
    try:
        with open(os.path.join(data_dir, "prepare.json")) as f:
            return json.load(f).get(key, default)
    except (OSError, ValueError):
        return default


def labels_of(data_dir):  # "single" (a class per film) or "multi" (a 0/1 column per finding)
    return prepared(data_dir, "labels", "single")


def classes_of(data_dir):  # the class names (multi: the findings) in class_id order; NIH's six where it names none
    return list(prepared(data_dir, "classes", CLASSES))


# -----------------------------------------------------------------------------
# The noise schedule (Ho et al. 2020): 1000 steps, betas linear from 1e-4 to 0.02; the model predicts eps or
# v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022). --shift s divides every SNR(t) by s^2
# (Hoogeboom et al. 2023): neighbouring pixels average the noise away, so a larger image needs noisier steps.


def make_schedule(prediction="v_prediction", shift=1.0):  # diffusers' names: v_prediction or epsilon
    from diffusers import DDPMScheduler
    kw = dict(num_train_timesteps=NUM_TIMESTEPS, prediction_type=prediction, clip_sample=True)
    linear = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, **kw)
    if shift == 1.0:
        return linear
    snr = linear.alphas_cumprod.double() / (1 - linear.alphas_cumprod.double()) / shift ** 2
    alpha_bar = snr / (1 + snr)  # (1000,) shifted
    betas = 1 - alpha_bar / torch.cat([torch.ones(1, dtype=alpha_bar.dtype), alpha_bar[:-1]])
    return DDPMScheduler(trained_betas=betas.tolist(), **kw)  # a diffusers config as any other: loadable, exportable


def schedule_of(ckpt):  # the schedule a checkpoint was trained on (checkpoints before v-prediction: eps, linear)
    return make_schedule(**ckpt.get("schedule", {"prediction": "epsilon"}))


def add_noise(x0, eps, t, alpha_bar):  # the forward process; x0, eps: (B, 1, H, W), t: (B,)
    a = alpha_bar.to(x0.device)[t].view(-1, 1, 1, 1).to(x0.dtype)  # (B, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps  # xt


def target(x0, eps, t, alpha_bar, prediction="v_prediction"):  # what the UNet learns to output: eps, or v (above)
    return eps if prediction == "epsilon" else add_noise(eps, -x0, t, alpha_bar)  # v = sqrt(a) eps - sqrt(1-a) x0


def loss_weights(alpha_bar, prediction="v_prediction", loss="mse", gamma=None):  # the defaults are train.py's
    """(1000,) weight of each t in the MSE: 1 for mse. In x0 units an eps-MSE weighs t by SNR, a v-MSE by SNR + 1.
    min-snr (Hang et al. 2023) makes that min(SNR, gamma): less weight at low noise. low-noise does the opposite:
    (SNR + 1) * min(SNR + 1, gamma)^0.5, mean 1 over t; the fine texture is drawn at low noise (docs/results.md)."""
    snr = alpha_bar / (1 - alpha_bar)
    native = snr if prediction == "epsilon" else snr + 1  # the x0 weight the plain MSE already gives
    if loss == "mse":
        return torch.ones_like(snr)
    if loss == "min-snr":
        return snr.clamp(max=5.0 if gamma is None else gamma) / native
    w = (snr + 1) * (snr + 1).clamp(max=100.0 if gamma is None else gamma).sqrt() / native
    return w / w.mean()

# -----------------------------------------------------------------------------
# Samplers, all run in the one loop of sample(). The diffusers ones are built on the training schedule's config (its
# betas); ddpm is the ancestral 1000-step sampler, the others deterministic fast solvers. ddim-2m: ddim_2m_step().

SAMPLERS = {  # name: our step function, or (diffusers scheduler, its options)
    "ddim-2m": "ddim_2m_step",  # below, at noise levels spaced by karras_timesteps
    # "trailing" spacing: the first step starts at t=999, pure noise, at any step count (Lin et al. 2023)
    "ddpm": ("DDPMScheduler", dict(timestep_spacing="trailing")),
    "ddim": ("DDIMScheduler", dict(timestep_spacing="trailing")),
    # x0 kept in [-1, 1], as ddpm/ddim's clip_sample does: without it a few-step solver can run away to noise
    "dpm++": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2, thresholding=True,
                                                  sample_max_value=1.0)),
}
DEFAULT_STEPS = {"ddim-2m": 25, "ddpm": 1000, "ddim": 50, "dpm++": 25}
DEFAULT_SAMPLER, DEFAULT_GUIDANCE = "ddim-2m", 1.25  # sample.py's sampler and guidance scale, chosen by measurement
# (docs/results.md); train.py's sample grids and the exported model card use them too
RHO, T_MIN = 7.0, 1  # ddim-2m's steps: noise levels spaced as Karras et al. (2022), from t=999 down to T_MIN; the
# last step takes the model's estimate of the film there, which keeps less of its finest grain the higher T_MIN is
CHURN = (100, 600)  # ddim-2m with eta > 0 adds fresh noise only at these t, where the grain of a few films forms


def karras_timesteps(steps, alpha_bar):
    """(steps,) distinct t from 999 to T_MIN whose noise levels sigma = sqrt((1 - a) / a) are evenly spaced in
    sigma^(1/RHO). Against even steps it spends fewer of them at t 100-600, where a small model's estimates of the
    film are grainy, and its films come out less grainy (measured: docs/results.md)."""
    sigma = ((1 - alpha_bar.double()) / alpha_bar.double()).sqrt().numpy()  # (1000,), rising with t
    hi, lo = sigma[-1] ** (1 / RHO), sigma[T_MIN] ** (1 / RHO)
    target = (hi + np.linspace(0, 1, steps) * (lo - hi)) ** RHO  # (steps,) high noise first
    t = np.interp(np.log(target), np.log(sigma), np.arange(NUM_TIMESTEPS)).round().astype(np.int64)
    t[0], t[-1] = NUM_TIMESTEPS - 1, T_MIN if steps > 1 else NUM_TIMESTEPS - 1
    for i in range(steps - 2, 0, -1):  # where rounding made two steps one, move the higher up by one
        t[i] = max(t[i], t[i + 1] + 1)
    for i in range(1, steps):  # ... and back under t=999 from the top
        t[i] = min(t[i], t[i - 1] - 1)
    return torch.from_numpy(t)


def diffusers_scheduler(name, config):  # SAMPLERS[name] built on a schedule's config (its betas)
    import diffusers
    scheduler, options = SAMPLERS[name]
    return getattr(diffusers, scheduler).from_config(config, **options)


def make_sampler(name, steps, schedule=None):
    """-> (diffusers scheduler, None for ddim-2m; timesteps (steps,) long, high noise first)"""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    most = NUM_TIMESTEPS - T_MIN if name == "ddim-2m" else NUM_TIMESTEPS  # ddim-2m: 999
    if not 1 <= steps <= most:
        raise ValueError(f"--steps {steps}: {name} takes between 1 and {most}")
    schedule = schedule or make_schedule()
    if name == "ddim-2m":
        return None, karras_timesteps(steps, schedule.alphas_cumprod)
    scheduler = diffusers_scheduler(name, {**schedule.config, "prediction_type": "epsilon"})  # fed eps
    scheduler.set_timesteps(steps)
    return scheduler, scheduler.timesteps


def ddim_2m_step(xt, eps, t, s, alpha_bar, x0_prev=None, t_prev=None, eta=0.0, noise=None):
    """One ddim-2m step from t down to s (-1: the clean image). DDIM's step keeps the model's eps for the noise (an eps
    model's x0 is its error times 157 at t=999); the clipped, smooth x0 gets DPM-Solver++(2M)'s extrapolation from the
    last two (Lu et al. 2022). -> (x_s, this step's x0)"""
    a_t, a_s = alpha_bar[t], (alpha_bar[s] if s >= 0 else 1.0)
    lam = lambda t: 0.5 * math.log(alpha_bar[t] / (1 - alpha_bar[t]))  # log signal-to-noise ratio of xt, per 2
    x0 = ((xt - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
    # eta > 0: part of the noise in x_s is fresh, not the model's eps; it washes out the model's errors at mid t
    sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) if CHURN[0] <= t <= CHURN[1] and s >= 0 else 0
    x_s = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - sigma ** 2) * eps
    if sigma > 0:
        x_s = x_s + sigma * noise()
    if x0_prev is not None and s >= 0:  # the last step, to the clean image, stays first order
        h, h_prev = lam(s) - lam(t), lam(t) - lam(t_prev)
        x_s = x_s + math.sqrt(a_s) * (1 - math.exp(-h)) * h / (2 * h_prev) * (x0 - x0_prev)
    return x_s, x0


@torch.no_grad()
def sample(model, labels, sampler="ddim-2m", steps=25, guidance=1.0, generators=None, schedule=None, eta=0.0):
    """One image per label (B,) or label set (B, F + 1) -> (B, 1, H, W) float32 in [-1, 1]. generators: one CPU
    torch.Generator per image, so image i depends on its own seed alone; schedule: the model's training schedule
    (schedule_of(ckpt)); eta: ddim-2m only, the share of DDIM's stochastic noise (Song et al. 2021; 1 = as much as
    ddpm) added at t in CHURN."""
    device, size, schedule = labels.device, model.config.sample_size, schedule or make_schedule()
    scheduler, timesteps = make_sampler(sampler, steps, schedule)
    generators = generators or [torch.Generator().manual_seed(i) for i in range(len(labels))]
    noise = lambda: torch.cat([torch.randn(1, 1, size, size, generator=g) for g in generators]).to(device)  # per image
    xt = noise()  # (B, 1, H, W): pure noise, each image's scaled to unit variance: a draw's spread varies by ~1%
    xt = xt / xt.std(dim=(1, 2, 3), keepdim=True)  # (1/sqrt(2HW)), and the sampler carries that excess into the film
    both = torch.cat([labels, null_labels(model, labels)])  # the class, then the null label
    extra = {"generator": generators} if sampler == "ddpm" else {}  # only ddpm adds fresh noise each step
    alpha_bar, v = schedule.alphas_cumprod.tolist(), schedule.config.prediction_type == "v_prediction"
    x0_prev = t_prev = None
    for i, t in enumerate(timesteps.tolist()):
        x_in = xt if sampler == "ddim-2m" else scheduler.scale_model_input(xt, t)
        if guidance == 1.0:  # plain conditional model: one forward, no doubled batch
            out = model(x_in, t, class_labels=labels).sample.float()  # eps or v
        else:  # classifier-free guidance: cond and null in one batched forward, linear in the output (eps or v)
            out_cond, out_null = model(torch.cat([x_in, x_in]), t, class_labels=both).sample.float().chunk(2)
            out = out_null + guidance * (out_cond - out_null)
        eps = math.sqrt(1 - alpha_bar[t]) * xt + math.sqrt(alpha_bar[t]) * out if v else out  # v -> eps
        if sampler == "ddim-2m":  # to the next t (-1 after the last: the clean image)
            s = timesteps[i + 1].item() if i + 1 < len(timesteps) else -1
            (xt, x0_prev), t_prev = ddim_2m_step(xt, eps, t, s, alpha_bar, x0_prev, t_prev, eta, noise), t
        else:
            xt = scheduler.step(eps, t, xt, **extra).prev_sample
    return xt.clamp(-1, 1)

# -----------------------------------------------------------------------------
# Command lines, CPU threads, autocast


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):  # --help shows the defaults, except where there is none
    def _get_help_string(self, action):
        none = action.default is None or action.default is False or action.default == []  # (0 shows: "default: 0")
        return action.help if none else super()._get_help_string(action)


def set_threads(device):
    """CPU work: a thread per core that the last minute's load left idle (os.getloadavg; every core where there is
    none), unless the user set OMP_NUM_THREADS: on a shared CPU, threads beyond the free cores run many times slower.
    Returns the thread count."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # runnable processes, averaged over 1 min
        torch.set_num_threads(max(1, min(cores, round(cores - busy))))
    return torch.get_num_threads()


def bar_pace():
    """tqdm keywords for the long loops: tqdm's own on a terminal; into a log file (stderr not a terminal) a redraw a
    minute, not ten a second (maxinterval too: tqdm's monitor thread redraws a bar quiet for longer than it)"""
    return {} if sys.stderr.isatty() else {"mininterval": 60, "maxinterval": 60}


def auto_amp(device):
    """Autocast: bf16 where the GPU has bf16 tensor cores (compute capability >= 8.0, or ROCm), else fp16; "off" on the
    CPU. Not torch.cuda.is_bf16_supported(): it is true where bf16 is only emulated (V100, T4), slower than fp16."""
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.version.hip or torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"

# -----------------------------------------------------------------------------
# Checkpoints: plain tensors and Python types, read with torch.load(weights_only=True): no code in a file ever runs.


def replace_file(path, save):  # whole or not at all: save(a temporary name), then renamed over path
    save(f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def save_checkpoint(path, ckpt):  # a crash mid-write never leaves a half-written ckpt.pt
    replace_file(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path, map_location="cpu"):
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
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


def unet_config(model):  # as plain JSON types: diffusers' FrozenDict is not weights_only-loadable
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


def unet_from_checkpoint(ckpt, ema=True, path="checkpoint"):  # path: the file, for the error message
    from diffusers import UNet2DModel
    try:
        model = UNet2DModel.from_config(ckpt["unet_config"])
        model = multi_hot(model) if ckpt.get("labels") == "multi" else model
        model.load_state_dict(ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"])
    except (KeyError, RuntimeError) as e:  # a project checkpoint whose weights are missing or do not fit its config
        raise ValueError(f"{path}: cannot build the UNet from it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]})") from None
    return model.eval()
