"""
train.py - train the class-conditional DDPM on prepared chest X-rays (prepare_data.py output): MSE, AdamW, EMA, CFG.

    python train.py --batch-size 8                                    # data/nih -> runs/nih-base-256
    python train.py --data-dir data/pmnist32 --batch-size 32 --max-steps 8000 --snapshot-every 1000   # 32 px on a CPU
    torchrun --nproc_per_node 4 train.py --batch-size 8               # DDP, batch 8 per GPU
    python train.py --resume --out-dir runs/nih-base-256              # continue where it stopped (or was stopped)

Writes into --out-dir: ckpt.pt (all --resume needs), metrics.csv, samples_step{N:06d}.png (EMA samples, a row per
class) and snapshots/ (--snapshot-every, for curve.py). instruments/export.py makes a run a diffusers folder.
Ctrl-C or SIGTERM (once or repeated): finish the step, save, exit 0; a second Ctrl-C aborts.
"""
import argparse
import copy
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from model import (AUTO, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, NUM_TIMESTEPS, PRESETS, HelpFormatter,
                   add_noise, auto_amp, bar_pace, build_unet, classes_of, labels_of, load_checkpoint, loss_weights,
                   make_schedule, null_labels, pick_preset, replace_file, sample, save_checkpoint, set_threads, target,
                   unet_config)

VAL_IMAGES = 256    # fixed val subset: enough for a stable loss, small enough to evaluate often
VAL_SEED = 1234     # fixed t and noise for the val loss, so values compare across evaluations
LABEL_W = 80        # pixels left of the sample grid for the class names
STOP_CHECK = 10     # DDP: steps between the ranks' agreement on Ctrl-C / SIGTERM (a sync)
# --lr default per preset. tiny: 1e-3 beat 5e-4 on real CXRs at 32 px, and 2e-3 left fewer grainy films than 1e-3 at
# 64 px (docs/results.md); tiny4 (tiny + an 8x8 level) takes it (1e-3 and 4e-3 tried at one seed only); small: 5e-4
# ran stable at 32 px; base keeps the original design's 1e-4 (not yet measured).
PRESET_LR = {"tiny": 2e-3, "tiny4": 2e-3, "small": 5e-4, "base": 1e-4}
WARMUP_SHARE = 80   # default --warmup-steps: max-steps / 80, at most 1000 (originally always 1000: 2/3 of a short run)


def die(msg):
    raise SystemExit(f"train.py: error: {msg}")


def parse_args(argv):
    """The flags, checked; on --resume the checkpoint's, but for those given again. -> (args, the checkpoint or None)"""
    p = argparse.ArgumentParser(description="train the class-conditional CXR DDPM", formatter_class=HelpFormatter)
    # ---- data and model ----
    p.add_argument("--data-dir", default="data/nih", help="prepare_data.py --out folder (train/val.csv, cache.npy)")
    p.add_argument("--out-dir", default=None, help="run folder (default runs/<data dir name>-<preset>-<size>)")
    p.add_argument("--balance", default="none", choices=["none", "sqrt", "inverse"], help="class weights of the draw")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader processes (default: 0 on a CPU with "
                   "cache.npy, where a worker only takes a core from training; else 4)")
    auto = ", ".join(f"{size} px {name}" for size, name in AUTO.items())
    p.add_argument("--preset", default="auto", help=f"UNet size: auto ({auto}, larger base) or {', '.join(PRESETS)}")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the cache's, else 256)")
    # ---- optimisation ----
    p.add_argument("--batch-size", type=int, default=8, help="images per step per process (before --grad-accum)")
    p.add_argument("--lr", type=float, default=None, help=f"peak AdamW learning rate (default per preset: {PRESET_LR})")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--max-steps", type=int, default=100_000, help="optimizer steps in all (the cosine ends here)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help=f"linear LR warmup steps (default: max-steps/{WARMUP_SHARE}, at most 1000)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay of the weights used for samples/export")
    p.add_argument("--cond-drop", type=float, default=0.1, help="P(null label), for classifier-free guidance")
    p.add_argument("--prediction", default="v_prediction", choices=["v_prediction", "epsilon"],
                   help="what the UNet outputs (diffusers' names); v_prediction: measured best (docs/results.md)")
    p.add_argument("--shift", type=float, default=1.0, help="noise schedule shift: SNR(t) / shift^2 (1: linear betas)")
    p.add_argument("--loss", default="mse", choices=["mse", "min-snr", "low-noise"],
                   help="MSE weights over t (model.loss_weights)")
    p.add_argument("--snr-gamma", type=float, default=None, help="the SNR cap of --loss (min-snr: 5, low-noise: 100)")
    # ---- system ----
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="autocast (auto: bf16 on GPUs with bf16 cores, else fp16; fp32 on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--fast-path", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last + fused AdamW (default: on CUDA; --fast-path runs the GPU path on a CPU)")
    p.add_argument("--device", default=None, help="cuda|cpu (default cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the data order and the noise")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir (start it if it has no "
                   "ckpt.pt; a finished run stays as it is), so the same command can be run again")
    # ---- logging (an --*-every of 0 turns it off) ----
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines / metrics.csv rows")
    p.add_argument("--eval-every", type=int, default=1000, help="steps between val losses")
    p.add_argument("--save-every", type=int, default=1000, help="steps between ckpt.pt saves (also saved at the end)")
    p.add_argument("--snapshot-every", type=int, default=0, help="steps between EMA snapshots in snapshots/ (curve.py)")
    p.add_argument("--sample-every", type=int, default=5000, help="steps between sample grids")
    p.add_argument("--sample-guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance of grids")
    p.add_argument("--sample-per-class", type=int, default=4, help="images per class (row) in a grid")
    args, ckpt = p.parse_args(argv), None
    if args.out_dir is None:
        size = args.image_size or cache_size(args.data_dir) or 256
        name = os.path.basename(os.path.normpath(args.data_dir))
        args.out_dir = os.path.join("runs", f"{name}-{pick_preset(args.preset, size)}-{size}")
    path = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume and os.path.exists(path):
        try:
            ckpt = load_checkpoint(path)
        except ValueError as e:
            die(f"--resume: {e}")
        saved = {"prediction": "epsilon", "shift": 1.0, **ckpt["args"]}  # before v-prediction they were not recorded
        saved["prediction"] = {"v": "v_prediction", "eps": "epsilon"}.get(saved["prediction"], saved["prediction"])
        saved["fast_path"] = saved.get("fast_path") or None  # False, as older runs saved "not asked": the device's path
        p.set_defaults(**{**saved, "out_dir": args.out_dir})  # ^ the short names older runs saved
        args = p.parse_args(argv)
    elif os.path.exists(path):
        die(f"{args.out_dir} already holds a run (ckpt.pt): pass --resume to continue it or choose another --out-dir")
    for flag in ("batch_size", "max_steps", "grad_accum", "sample_per_class"):
        if getattr(args, flag) < 1:
            die(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.preset not in PRESETS and args.preset != "auto":
        die(f"--preset {args.preset}: unknown; choose from auto, {', '.join(PRESETS)}")
    if not ((args.snr_gamma is None or args.snr_gamma > 0) and args.shift > 0):
        die(f"--snr-gamma {args.snr_gamma} / --shift {args.shift}: must be > 0")
    return args, ckpt

# -----------------------------------------------------------------------------
# schedules: learning rate (linear warmup, then cosine to 0), the EMA of the weights, label dropout


def lr_at(step, lr, warmup_steps, max_steps):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema, model, decay):  # ema <- decay * ema + (1 - decay) * model; the UNet has no buffers that learn
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)  # one op, not ~300 small ones


def drop_labels(y, cond_drop, g, null):  # classifier-free guidance training: a label becomes null with p = cond_drop
    drop = torch.rand(len(y), generator=g, device=y.device) < cond_drop  # (B,): a film's whole label set at once
    return torch.where(drop.view(-1, *[1] * (y.ndim - 1)), null, y)  # null: null_labels(unet, y)

# -----------------------------------------------------------------------------
# data: the order of training images is a function of (seed, position) alone, so --resume is exact


def class_weights(class_id, balance):
    """Per-image draw weight n_c^0, n_c^-1/2 or n_c^-1: class shares become proportional to n, sqrt(n), 1."""
    if class_id.ndim > 1:  # label sets (--labels multi): films drawn as they come (parse_args refuses --balance)
        return torch.ones(len(class_id), dtype=torch.float64)
    power = {"none": 0.0, "sqrt": -0.5, "inverse": -1.0}[balance]
    n = np.bincount(class_id).astype(np.float64)
    return torch.from_numpy(n[class_id] ** power)


def index_stream(weights, balanced, seed, start):
    """Infinite stream of training-row indices from position start. 'Epoch' e (len(weights) draws) is a
    permutation (balance none) or weighted draws with replacement, from a generator seeded by (seed, e)."""
    n = len(weights)
    epoch, i = divmod(start, n)
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = (torch.multinomial(weights, n, replacement=True, generator=g) if balanced
                 else torch.randperm(n, generator=g))
        yield from order[i:].tolist()
        epoch, i = epoch + 1, 0


def rank_batches(stream, batch_size, rank, world):
    """Each global batch is batch_size * world consecutive stream items; this rank takes its slice."""
    while True:
        chunk = [next(stream) for _ in range(batch_size * world)]
        yield chunk[rank * batch_size:(rank + 1) * batch_size]


def load_batch(rows, cache, cache_row, path, class_id, size):
    """Runs in a DataLoader worker. rows: indices into the split. Returns uint8 (B, 1, H, W), labels (B,) or
    (B, F + 1) (--labels multi: the finding columns and the null column)."""
    if cache is not None:  # memory-mapped: only these rows are read from disk
        x = open_cache(cache)[cache_row[rows]]
    else:  # Pillow antialiases when it shrinks; never flipped
        x = np.stack([np.asarray(Image.open(path[r]).convert("L").resize((size, size), Image.BILINEAR)) for r in rows])
    return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1), torch.from_numpy(class_id[rows])


def read_split(data_dir, split, classes, multi=False):
    """-> load_batch's cache_row, path and class_id, as arrays. An unlabelled film (class_id -1, an empty label) gets
    the null label, len(classes): it trains the unconditional model only, and --balance draws it as a group.
    multi: class_id is (N, F + 1) float32, the finding columns of the split (classes) and a null column of 0."""
    csv = os.path.join(data_dir, f"{split}.csv")
    if not os.path.isfile(csv):
        die(f"--data-dir {data_dir}: no {split}.csv; prepare the data first: python prepare_data.py "
            f"--csv Data_Entry_2017.csv --images /data/nih --out {data_dir}  (or --demo --out {data_dir} --size 64)")
    df = pd.read_csv(csv)
    missing = ({*classes} if multi else {"class_id"}) | {"path", "cache_row"}
    missing -= set(df.columns)
    if missing:
        die(f"{csv}: no column {sorted(missing)[0]!r}; rerun prepare_data.py")
    if len(df) == 0:
        die(f"{csv}: the {split} split has no rows")
    if multi:  # 0/1 per finding; the null column is set only where a label is dropped
        Y = df[classes].to_numpy(np.float32)
        if (bad := np.flatnonzero(~np.isin(Y, (0, 1)).all(1)))[:1].size:
            die(f"{csv}: row {bad[0] + 2}: finding columns hold other values than 0 and 1; rerun prepare_data.py")
        return {"cache_row": df["cache_row"].to_numpy(), "path": df["path"].to_numpy(),
                "class_id": np.concatenate([Y, np.zeros((len(df), 1), np.float32)], 1)}
    named = np.array(classes + [None])[df["class_id"].clip(-1, len(classes))]  # -1 and too large: None
    unlabelled = (df["class_id"] == -1) & df["label"].isna()  # an empty label: a film for the null label only
    if (bad := np.flatnonzero((named != df["label"].to_numpy()) & ~unlabelled))[:1].size:
        die(f"{csv}: row {bad[0] + 2}: class_id {df['class_id'].iat[bad[0]]} '{df['label'].iat[bad[0]]}' is not a "
            f"class of {data_dir} ({', '.join(classes)}); rerun prepare_data.py")
    df["class_id"] = df["class_id"].mask(unlabelled, len(classes))
    return {c: df[c].to_numpy() for c in ("cache_row", "path", "class_id")}


def label_sets(classes, y):
    """--labels multi: {"Atelectasis|Effusion": films} over the split's label sets y (N, F + 1), for the checkpoint:
    sample.py --match-train draws in these proportions"""
    sets, films = np.unique(y[:, :-1].astype(bool), axis=0, return_counts=True)
    return {"|".join(np.array(classes)[s]) or "No Finding": int(n) for s, n in zip(sets, films)}


def open_cache(path):  # memory-mapped; a copy cut short (an interrupted copy) fails np.load's header or size checks
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, EOFError):
        die(f"{path} is damaged (cut short?): prepare the data again with prepare_data.py")


def cache_size(data_dir):  # None: no cache.npy (prepare_data.py --no-cache), the workers decode the PNGs
    cache = os.path.join(data_dir, "cache.npy")
    return open_cache(cache).shape[1] if os.path.isfile(cache) else None


def ignore_signals(worker_id):  # DataLoader workers leave Ctrl-C / SIGTERM to the main process, which saves
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

# -----------------------------------------------------------------------------
# evaluation, samples, the run folder


@torch.no_grad()
def val_loss(loss_per_image, unet, val_set, batch_size):
    """The training loss (no label dropout) on the fixed val subset: fixed x0, t and noise, so only the weights change
    between calls, and train and val losses read on the same footing."""
    unet.eval()
    n = len(val_set[0])
    total = sum(loss_per_image(unet, *(v[i:i + batch_size] for v in val_set)).sum() for i in range(0, n, batch_size))
    unet.train()
    return total.item() / n


def grid_rows(classes, train, multi):
    """The rows of a sample grid: (names, labels (R,) or (R, F + 1)): every class; or No Finding and each finding
    the training films hold (--labels multi), alone."""
    if not multi:
        return classes, torch.arange(len(classes))
    held = np.flatnonzero(train["class_id"][:, :-1].sum(0) > 0)  # findings with films
    eye = torch.eye(len(classes) + 1)
    return ["No Finding"] + [classes[f] for f in held], torch.cat([torch.zeros(1, len(classes) + 1), eye[held]])


def save_grid(ema, path, per_class, guidance, step, device, autocast, schedule, grid):
    """One row per class (grid_rows), EMA weights, sample.py's default sampler, the same seeds every time so grids
    compare."""
    classes, labels = grid
    labels = labels.to(device).repeat_interleave(per_class, 0)  # (classes * per_class[, F + 1])
    with autocast():
        x = sample(ema, labels, DEFAULT_SAMPLER, DEFAULT_STEPS[DEFAULT_SAMPLER], guidance,
                   [torch.Generator().manual_seed(i) for i in range(len(labels))], schedule)
    x = ((x.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()[:, 0]  # (6k, H, W)
    size = x.shape[-1]
    rows = x.reshape(len(classes), per_class, size, size).transpose(0, 2, 1, 3).reshape(len(classes) * size, -1)
    im = Image.new("L", (LABEL_W + rows.shape[1], rows.shape[0]))
    im.paste(Image.fromarray(rows), (LABEL_W, 0))
    draw = ImageDraw.Draw(im)
    for c, name in enumerate(classes):
        draw.text((2, c * size + size // 2 - 6), name, fill=255)
    info = PngInfo()  # synthetic images must be recognisable as synthetic
    info.add_text("synthetic", "1")
    info.add_text("source", f"train.py EMA step {step}, {DEFAULT_SAMPLER}, guidance {guidance}")
    replace_file(path, lambda tmp: im.save(tmp, format="PNG", pnginfo=info))


def rng_state():  # as plain tensors and lists: weights_only=True loads them
    _, keys, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), *map(float, rest)], "python": list(random.getstate()[1])}


def set_rng_state(rng):
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    random.setstate((3, tuple(rng["python"]), None))


def append_metrics(path, step, time_s, loss="", lr="", img_per_s="", val=""):
    header = "" if os.path.exists(path) else "step,time_s,loss,lr,img_per_s,val_loss\n"
    with open(path, "a") as f:
        f.write(f"{header}{step},{time_s:.1f},{loss},{lr},{img_per_s},{val}\n")


def rank_sum(x, world):  # x summed over the DDP ranks (the loop's only syncs); x itself in a single process
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x

# -----------------------------------------------------------------------------
# the phases of main(), in order: processes and precision, the data, the model (restored on --resume)


def setup_device(args):
    """-> (device, world, rank, threads): torchrun's processes (one GPU each), or this process alone"""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))  # set by torchrun
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = set_threads(device)  # the free cores, or OMP_NUM_THREADS
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, world, rank, threads


def setup_precision(args, device):
    """-> (amp, autocast, scaler): bf16 or fp16 autocast on a GPU (model.auto_amp), fp32 on a CPU unless --amp bf16"""
    amp = args.amp if args.amp != "auto" else auto_amp(device)
    if amp == "fp16" and device.type != "cuda":  # CPU autocast has bf16, no GradScaler
        die(f"--amp {args.amp}: fp16 needs CUDA; the CPU trains in fp32 or bf16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = partial(torch.autocast, device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")  # fp16 only: bf16 has fp32's range
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: cuDNN times its conv algorithms once
    return amp, autocast, scaler


def load_data(args, ckpt):
    """-> (classes, multi, train, val, cache, size). Sets what follows from the data in args, so the checkpoint
    records it: the image size, the preset, the LR and the warmup."""
    classes = classes_of(args.data_dir)  # names in class_id order (prepare.json): they size the class embedding
    multi = labels_of(args.data_dir) == "multi"  # classes: the findings, a 0/1 column each
    if multi and args.balance != "none":
        die(f"--balance {args.balance}: draws by class; {args.data_dir} holds label sets (--labels multi)")
    train, val = (read_split(args.data_dir, split, classes, multi) for split in ("train", "val"))
    cached = cache_size(args.data_dir)
    cache = os.path.join(args.data_dir, "cache.npy") if cached else None
    args.image_size = size = args.image_size or cached or 256
    args.preset = pick_preset(args.preset, size)  # the checkpoint records the preset that was built
    args.lr = args.lr if args.lr is not None else PRESET_LR[args.preset]  # recorded, so --resume keeps it
    args.warmup_steps = min(1000, args.max_steps // WARMUP_SHARE) if args.warmup_steps is None else args.warmup_steps
    if cached and size != cached:
        die(f"--image-size {size} does not match {cache} ({cached}px); omit it or use prepare_data.py --size {size}")
    if ckpt is not None and (ckpt["image_size"], ckpt["classes"], ckpt.get("labels", "single")) != (
            size, classes, "multi" if multi else "single"):
        die(f"--resume: {args.out_dir}/ckpt.pt was trained at {ckpt['image_size']}px on classes {ckpt['classes']} "
            f"({ckpt.get('labels', 'single')}-label), not at {size}px on {classes} ({'multi' if multi else 'single'}"
            f"-label); use another --out-dir")
    return classes, multi, train, val, cache, size


def make_loader(args, train, cache, size, seen, device, rank, world):
    """-> (loader, workers): this rank's training batches, from image `seen` of the stream on (where the run stands)"""
    workers = args.num_workers if args.num_workers is not None else 0 if cache and device.type == "cpu" else 4
    stream = index_stream(class_weights(train["class_id"], args.balance), args.balance != "none", args.seed, seen)
    loader = torch.utils.data.DataLoader(
        range(len(train["path"])), batch_sampler=rank_batches(stream, args.batch_size, rank, world),
        collate_fn=partial(load_batch, cache=cache, size=size, **train),  # runs in the workers
        num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=ignore_signals)
    return loader, workers


def fixed_val_set(val, cache, size, device):  # -> [x0, eps, t, y] on device: VAL_IMAGES films, fixed t and noise
    g = torch.Generator().manual_seed(VAL_SEED)
    rows = torch.randperm(len(val["path"]), generator=g)[:VAL_IMAGES].tolist()
    x0, y = load_batch(rows, cache, size=size, **val)
    x0 = x0.float() / 127.5 - 1  # (N, 1, H, W) in [-1, 1]
    t, eps = torch.randint(0, NUM_TIMESTEPS, (len(rows),), generator=g), torch.randn(x0.shape, generator=g)
    return [v.to(device) for v in (x0, eps, t, y)]


def build(args, ckpt, size, classes, multi, device):
    """-> (unet, ema, opt, memory_format). The GPU path (CUDA, or --fast-path): channels_last weights, fused AdamW."""
    torch.manual_seed(args.seed)
    try:
        unet = build_unet(size, args.preset, len(classes), multi)
    except ValueError as e:
        die(f"--image-size {size} / --preset {args.preset}: {e}")
    if ckpt is not None and unet_config(unet) != ckpt["unet_config"]:
        die(f"--resume: {args.out_dir}/ckpt.pt holds another UNet (not --preset {args.preset}); use another --out-dir")
    gpu_path = device.type == "cuda" if args.fast_path is None else args.fast_path  # on a CPU too, so tests run it
    memory_format = torch.channels_last if gpu_path else torch.contiguous_format  # bench.py's table decides
    unet = unet.to(device, memory_format=memory_format).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    try:  # fused: one kernel for all ~300 tensors
        opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=gpu_path or None)
    except RuntimeError as e:
        die(f"fused AdamW on {device}: {e} (--fast-path on a CPU needs torch >= 2.4)")
    return unet, ema, opt, memory_format


def restore(ckpt, unet, ema, opt, scaler):
    """--resume: the weights, the EMA, AdamW's state with this run's settings, the fp16 loss scale, every RNG"""
    unet.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    ckpt["optimizer"]["param_groups"] = opt.state_dict()["param_groups"]  # this run's fused, weight_decay
    opt.load_state_dict(ckpt["optimizer"])
    for p, s in opt.state.items():  # Adam moments in their weight's layout (a channels_last run saved them, or not)
        s.update({k: torch.empty_like(p).copy_(v) for k, v in s.items() if k != "step"})
    if ckpt["scaler"]:  # empty when saved without fp16
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])

# -----------------------------------------------------------------------------


def main(argv=None):
    # ---- setup: flags, processes, device, precision, the noise schedule and the loss ----
    args, ckpt = parse_args(argv)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    device, world, rank, threads = setup_device(args)
    master, cuda = rank == 0, device.type == "cuda"  # rank 0 alone logs and writes
    amp, autocast, scaler = setup_precision(args, device)
    schedule = dict(prediction=args.prediction, shift=args.shift)
    noise_schedule = make_schedule(**schedule)
    alpha_bar = noise_schedule.alphas_cumprod.to(device)  # (1000,)
    loss_weight = loss_weights(alpha_bar, schedule["prediction"], args.loss, args.snr_gamma)  # (1000,)

    def loss_per_image(net, x0, eps, t, y):  # (B,): the weighted MSE of the UNet's eps or v, for training and val alike
        xt = add_noise(x0, eps, t, alpha_bar)
        with autocast():
            pred = net(xt, t, class_labels=y).sample.float()  # (B, 1, H, W)
        return loss_weight[t] * (pred - target(x0, eps, t, alpha_bar, schedule["prediction"])).pow(2).mean((1, 2, 3))

    # ---- data: the stream of training batches from where the run stands, and the fixed val set ----
    classes, multi, train, val, cache, size = load_data(args, ckpt)
    start, seen, train_s = (ckpt["step"], ckpt["samples_seen"], ckpt.get("time_s", 0.0)) if ckpt else (0, 0, 0.0)
    loader, workers = make_loader(args, train, cache, size, seen, device, rank, world)
    val_set = fixed_val_set(val, cache, size, device) if master and args.eval_every else None

    # ---- model, EMA, optimizer (or all of them from the checkpoint) ----
    unet, ema, opt, memory_format = build(args, ckpt, size, classes, multi, device)
    if ckpt is not None:
        restore(ckpt, unet, ema, opt, scaler)
        ckpt = None  # its tensors now live in the model, EMA and optimizer: free the copies (~1.8 GB at base, per rank)
    model = DDP(unet, device_ids=[device.index] if cuda else None) if world > 1 else unet  # unet stays bare: its keys
    model = torch.compile(model) if args.compile else model  # compile(DDP(unet)): the all-reduce overlaps the backward

    # ---- the run folder: metrics.csv, checkpoints; Ctrl-C / SIGTERM finish the step, save and exit 0 ----
    metrics = os.path.join(args.out_dir, "metrics.csv")
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        if os.path.exists(metrics):  # rows logged after the checkpoint (a crash) are trained again: keep one per step
            m = pd.read_csv(metrics, dtype=str, keep_default_na=False)  # as written: no float reformatting
            replace_file(metrics, lambda tmp: m[m.step.astype(int) <= start].to_csv(tmp, index=False))
        n_null = 0 if multi else int((train["class_id"] == len(classes)).sum())  # unlabelled films
        unlabelled = f" ({n_null} unlabelled: null label only)" if n_null else ""
        print(f"train.py: {len(train['path'])} train{unlabelled} / {len(val['path'])} val images, {size}px, preset "
              f"{args.preset}, "
              f"{world} process(es) on {device} ({threads} threads, {workers} loader workers), amp {amp}, "
              f"steps {start}->{args.max_steps}, out {args.out_dir}")

    label_count = {"label_sets": label_sets(classes, train["class_id"])} if multi else {}  # sample.py --match-train

    def checkpoint(path, **state):  # ckpt.pt: + all --resume needs; a snapshot: the EMA alone (sample.py, curve.py)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_checkpoint(path, {"ema": ema.state_dict(), "step": done, "time_s": train_s, "schedule": schedule,
                               "unet_config": unet_config(unet), "classes": classes, "image_size": size,
                               "labels": "multi" if multi else "single", **label_count,
                               "args": vars(args), **state})
    stop = []

    def on_signal(signum, frame):
        if stop and signum == signal.SIGINT:  # a second Ctrl-C quits at once, without saving; a repeated SIGTERM
            raise KeyboardInterrupt  # (SLURM's, then torchrun's forwarded one) still saves
        stop.append(signum)
        tqdm.write(f"train.py: signal {signum}: finishing the step, saving, exiting (Ctrl-C again to abort)")
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    # ---- the loop ----
    g = torch.Generator(device)  # t, eps and label dropout; reseeded from (seed, micro-step, rank) each micro-step
    loss_sum = torch.zeros((), device=device)  # the loss stays on the device: no sync per step
    null = null_labels(unet, torch.tensor(train["class_id"][:1])).to(device)  # (1,) or (1, F + 1): what a
    # dropped label becomes
    batches, done, t_last = iter(loader), start, time.time()  # train_s: the training steps' seconds, no saves or evals
    logged = start, seen, train_s  # at the last log line, for the mean loss and img/s since
    due = lambda every: every > 0 and done % every == 0  # an --*-every of 0 turns the activity off
    bar = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, disable=rank > 0, dynamic_ncols=True,
               **bar_pace())
    for step in bar:
        lr = opt.param_groups[0]["lr"] = lr_at(step, args.lr, args.warmup_steps, args.max_steps)  # the UNet's one group
        for micro in range(args.grad_accum):
            x0, y = next(batches)  # uint8 (B, 1, H, W), (B,)
            x0 = (x0.to(device, non_blocking=True).float() / 127.5 - 1).contiguous(memory_format=memory_format)
            g.manual_seed(args.seed * 1_000_003 + (step * args.grad_accum + micro) * world + rank)
            t = torch.randint(0, NUM_TIMESTEPS, (len(x0),), generator=g, device=device)  # (B,) uniform
            eps = torch.randn(x0.shape, generator=g, device=device)  # (B, 1, H, W)
            y = drop_labels(y.to(device, non_blocking=True), args.cond_drop, g, null)
            # DDP averages the gradients on the last micro-batch only
            with model.no_sync() if world > 1 and micro < args.grad_accum - 1 else nullcontext():
                loss = loss_per_image(model, x0, eps, t, y).mean()
                scaler.scale(loss / args.grad_accum).backward()
            loss_sum += loss.detach() / args.grad_accum
        if args.clip > 0:
            scaler.unscale_(opt)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(unet.parameters(), args.clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, unet, min(args.ema_decay, (1 + step) / (10 + step)))  # warm-up: early EMA follows the model
        done, seen = step + 1, seen + args.batch_size * args.grad_accum * world

        stopping = bool(stop)  # read once: a signal arriving after this line is handled at the next step
        if world > 1:  # all ranks stop at one step (or the rest hang in the next all-reduce), agreed every STOP_CHECK
            stopping = done % STOP_CHECK == 0 and bool(rank_sum(torch.tensor(float(stopping), device=device), world))
        log, evaluate = due(args.log_every), due(args.eval_every)
        save = due(args.save_every) or done == args.max_steps or stopping
        if log or save:  # on every rank: the mean loss is all-reduced
            train_loss = rank_sum(loss_sum, world).item() / ((done - logged[0]) * world)
            if not math.isfinite(train_loss):
                die(f"loss is {train_loss} at step {done}; stopped. The last good checkpoint stays in {args.out_dir}")
        train_s += time.time() - t_last  # after .item(): a GPU's queued work is counted by the step that waits for it
        if log:
            ips = (seen - logged[1]) / (train_s - logged[2])
            if master:  # above the progress bar
                tqdm.write(f"step {done} | loss {train_loss:.4f} | lr {lr:.1e} | {ips:.0f} img/s")
            loss_sum.zero_()
            logged = done, seen, train_s
        if master and evaluate:
            v = val_loss(loss_per_image, unet, val_set, args.batch_size)
            tqdm.write(f"step {done} | val loss {v:.4f}")
        if master and (log or evaluate):
            append_metrics(metrics, done, train_s, *((f"{train_loss:.6g}", f"{lr:.6g}", f"{ips:.1f}") if log else ()),
                           val=f"{v:.6g}" if evaluate else "")
        if master and (due(args.sample_every) or args.sample_every > 0 and done == args.max_steps):  # and the last
            save_grid(ema, os.path.join(args.out_dir, f"samples_step{done:06d}.png"), args.sample_per_class,
                      args.sample_guidance, done, device, autocast, noise_schedule, grid_rows(classes, train, multi))
        if master and save:
            checkpoint(ckpt_path, model=unet.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                       samples_seen=seen, rng=rng_state())
        if master and due(args.snapshot_every):
            checkpoint(os.path.join(args.out_dir, "snapshots", f"ema_step{done:06d}.pt"))
        t_last = time.time()
        if stopping:
            break
    bar.close()
    for s, h in old_handlers.items():
        signal.signal(s, h)

    # ---- the end: ckpt.pt was saved in the last step ----
    if master:
        peak = f" (peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB)" if cuda else ""
        print(f"train.py: step {done}: wrote {ckpt_path}{peak}" if done > start else f"train.py: the run was already "
              f"at step {done} (--max-steps {args.max_steps}): nothing trained, {ckpt_path} unchanged")
    if world > 1:  # wait until every rank is here, so no gloo worker still holds a tensor from the last all-reduce:
        dist.barrier()  # tearing the group down under one deadlocks on the GIL (seen here as a hang at exit)
        del model  # DDP's reducer holds the group: drop it first
        dist.destroy_process_group()
    return unet, ema


if __name__ == "__main__":
    main()
