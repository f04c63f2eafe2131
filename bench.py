"""
bench.py - measured speed, as ratios taken in one run: data loading, the training step, sampling.

    python bench.py --device cuda --preset base            # the README table: one GPU, 256x256, batch 8 and 32
    python bench.py --device cuda --preset base --compile  # also torch.compile the fast training path
    python bench.py --quick                                # tiny preset on the CPU in under a minute (smoke test)

Prints a table and writes bench.json: every number, the device, the date, and the peak FLOP/s behind MFU.
MFU = 3 x model.flops_per_image (forward + backward ~ 3 forwards) x images/s / the device's peak.
Every row states its precision (fp32, bf16 or fp16 autocast); a configuration out of GPU memory is an "OOM" row.
"""
import argparse
import copy
import datetime
import gc
import json
import os
import platform
import tempfile
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline
from PIL import Image

import model

# dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s); --peak-tflops overrides
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}
PRECISION = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}  # autocast dtype: name


def get_parser():
    p = argparse.ArgumentParser(description="benchmark data loading, training and sampling",
                                formatter_class=model.HelpFormatter)
    # ---- what to run ----
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda|cpu")
    p.add_argument("--preset", default="base", help="UNet preset to time")
    p.add_argument("--image-size", type=int, default=256, help="image side in pixels")
    p.add_argument("--batch-sizes", default="8,32", help="training batch sizes, comma-separated")
    p.add_argument("--sample-batch", type=int, default=64, help="images per sampling batch")
    p.add_argument("--compile", action="store_true", help="add torch.compile to the fast training path")
    p.add_argument("--quick", action="store_true", help="tiny preset, 32 px, small batches: a CPU smoke test")
    # ---- measurement ----
    p.add_argument("--timed-steps", "--steps", type=int, default=20, help="timed training steps per configuration")
    p.add_argument("--ddpm-steps", type=int, default=1000, help="steps of the ddpm sampler and of DDPMPipeline")
    p.add_argument("--png-images", type=int, default=64, help="PNGs written (1024x1024, like NIH) to time decoding")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak TFLOP/s for MFU (default: datasheet bf16)")
    p.add_argument("--out", default="bench.json", help="where to write the numbers")
    return p


def timed(fn, device, repeat, warmup=None):
    """Median seconds of fn() over `repeat` runs, after a warm-up (compile, cuDNN autotune): warmup() or fn()."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # GPU work runs asynchronously
    (warmup or fn)()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def guarded(fn, device):
    """fn(), or {"error": "OOM"} where the configuration does not fit (fp32 eager at batch 32, base, 256 px needs
    ~70 GB): the other configurations still run. Any other error is a bug and stops the run."""
    try:
        return fn()
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is a RuntimeError; older messages say "out of memory"
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in str(e):
            raise
    gc.collect()  # out of the except block: the traceback no longer holds the frames, nor their tensors
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"error": "OOM"}


def ratio(a, b):  # throughput of row a over row b, or "-" where either ran out of memory
    return f"x{a['img_s'] / b['img_s']:.2f}" if "img_s" in a and "img_s" in b else "-"

# -----------------------------------------------------------------------------
# 1. data: decoding a full-size PNG (what prepare_data.py does once per image) vs reading the uint8 cache


def bench_data(n_png, size, batch):
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(n_png):  # smooth random "films": compress like real CXRs, unlike white noise
            small = rng.integers(0, 256, (64, 64), dtype=np.uint8)
            img = Image.fromarray(small).resize((1024, 1024), Image.BICUBIC)
            paths.append(os.path.join(tmp, f"{i:05d}.png"))
            img.save(paths[-1])
        t0 = time.perf_counter()
        decoded = [np.asarray(Image.open(p).convert("L").resize((size, size), Image.LANCZOS)) for p in paths]
        png_per_s = n_png / (time.perf_counter() - t0)  # one worker: this is also the cache build rate per worker
        cache = np.lib.format.open_memmap(os.path.join(tmp, "cache.npy"), "w+", np.uint8, (n_png, size, size))
        cache[:] = np.stack(decoded)
        cache.flush()
        cache = np.load(os.path.join(tmp, "cache.npy"), mmap_mode="r")
        n_read, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 1.0:  # random batches, as the training loader draws them
            rows = np.sort(rng.choice(n_png, min(batch, n_png), replace=False))
            x0 = torch.from_numpy(cache[rows]).float().div_(127.5).sub_(1).unsqueeze(1)  # (B, 1, H, W) in [-1, 1]
            n_read += len(x0)
        cache_per_s = n_read / (time.perf_counter() - t0)
        del cache
    return {"png_decode_img_s_per_worker": png_per_s, "cache_img_s_per_worker": cache_per_s,
            "cache_over_png": cache_per_s / png_per_s}

# -----------------------------------------------------------------------------
# 2. the training step: the plain fp32 eager loop vs the fast path (bf16, channels_last, fused AdamW, compile)


def bench_train(args, device, batch, fast, dtype, flops, peak):
    torch._dynamo.reset()  # compile afresh per configuration: no dynamic-shape graph from another batch size
    torch.manual_seed(0)
    unet = model.build_unet(args.image_size, args.preset).to(device).train()
    cuda = device.type == "cuda"
    if fast:  # as train.py on CUDA (and with --fast-path on a CPU)
        unet = unet.to(memory_format=torch.channels_last)
    fused = fast and (cuda or torch.__version__ >= (2, 4))  # fused AdamW on a CPU: torch >= 2.4
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=fused or None)
    step_fn = torch.compile(unet) if fast and args.compile else unet
    amp = torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)  # fp16 only: bf16 has fp32's range
    alpha_bar = model.make_schedule().alphas_cumprod.to(device)
    x0 = torch.randn(batch, 1, args.image_size, args.image_size, device=device)
    y = torch.randint(0, model.NULL_CLASS + 1, (batch,), device=device)

    def step():  # the same work as one train.py step: noise, predict eps, MSE, backward, clip, AdamW
        t = torch.randint(0, model.NUM_TIMESTEPS, (batch,), device=device)
        eps = torch.randn_like(x0)
        with amp:
            loss = F.mse_loss(step_fn(model.add_noise(x0, eps, t, alpha_bar), t, class_labels=y).sample.float(), eps)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    s = timed(step, device, args.timed_steps)
    img_s = batch / s
    return {"ms_per_step": 1e3 * s, "img_s": img_s,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "mfu": 3 * flops * img_s / peak if peak else None}

# -----------------------------------------------------------------------------
# 3. sampling: our loop (the default sampler with and without guidance; ddpm 1000) vs diffusers' DDPMPipeline


def bench_sample(args, device, batch, ddpm_steps, dtype):
    torch.manual_seed(0)
    unet = model.build_unet(args.image_size, args.preset).to(device).eval()
    labels = torch.arange(batch, device=device) % len(model.CLASSES)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    peer = copy.deepcopy(unet)  # DDPMPipeline, fp32, every step one conditional forward (the label is bound)
    fast_unet = unet.to(memory_format=torch.channels_last)
    peer.forward = partial(peer.forward, class_labels=labels)
    pipe = DDPMPipeline(unet=peer, scheduler=model.make_schedule())
    pipe.set_progress_bar_config(disable=True)

    def ours(sampler, w, n_steps):  # the fast path: channels_last, autocast
        with torch.autocast(device.type, dtype=dtype):
            model.sample(fast_unet, labels, sampler, n_steps, guidance=w, generators=gens)

    def theirs(n_steps):
        pipe(batch_size=batch, num_inference_steps=n_steps, output_type="np")

    rows, amp = [], PRECISION[dtype]
    d, n, w = model.DEFAULT_SAMPLER, model.DEFAULT_STEPS[model.DEFAULT_SAMPLER], model.DEFAULT_GUIDANCE
    for name, precision, run, steps in [(f"{d} {n}, guidance {w}", amp, partial(ours, d, w), n),
                                        (f"{d} {n}, no guidance", amp, partial(ours, d, 1.0), n),
                                        (f"ddpm {ddpm_steps}", amp, partial(ours, "ddpm", 1.0), ddpm_steps),
                                        (f"DDPMPipeline {ddpm_steps}", "fp32", theirs, ddpm_steps)]:
        # warm-up: 2 steps of the same shapes; the timed runs are long enough to time once
        rows.append({"sampler": name, "precision": precision, **guarded(
            lambda: {"img_s": batch / timed(partial(run, steps), device, 1, warmup=partial(run, 2))}, device)})
    return rows


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.quick:
        args.preset, args.image_size, args.batch_sizes, args.sample_batch = "tiny", 32, "8", 4
        args.timed_steps, args.png_images = min(args.timed_steps, 5), min(args.png_images, 16)
    device = torch.device(args.device)
    model.set_threads(device)  # the free cores: oversubscribed CPU threads run many times slower
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: error: --device cuda: no CUDA device here (use --device cpu)")
    try:
        flops = model.flops_per_image(model.build_unet(args.image_size, args.preset), args.image_size)
        batches = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError as e:
        raise SystemExit(f"bench.py: error: {e}")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # cuDNN times its conv algorithms per shape in the warm-ups
    # the fast path's autocast, as train.py --amp auto: bf16 where the GPU has bf16 cores (and on the CPU), else fp16
    cc = torch.cuda.get_device_capability(device) if device.type == "cuda" else (8, 0)
    fast_dtype = torch.bfloat16 if torch.version.hip or cc >= (8, 0) else torch.float16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAK_BF16.items() if k in name), None)
    report = {"device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "preset": args.preset, "image_size": args.image_size, "flops_per_image_fwd": flops,
              "peak_flops": peak, "peak_source": "--peak-tflops" if args.peak_tflops else "datasheet dense bf16"}
    print(f"{name} | {args.preset} {args.image_size}px | {flops / 1e9:.1f} GFLOP per forward | peak {peak}")

    report["data"] = bench_data(args.png_images, args.image_size, batches[0])
    d = report["data"]
    print(f"data   | PNG decode+resize {d['png_decode_img_s_per_worker']:.0f} img/s/worker | "
          f"cache {d['cache_img_s_per_worker']:.0f} img/s/worker | x{d['cache_over_png']:.0f}")

    report["train"] = []
    for batch in batches:
        for fast in (False, True):
            dtype = fast_dtype if fast else None
            r = {"batch": batch, "path": "fast" if fast else "fp32-eager", "precision": PRECISION[dtype],
                 **guarded(partial(bench_train, args, device, batch, fast, dtype, flops, peak), device)}
            report["train"].append(r)
            mem = f"{r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else "-"
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            cols = r["error"] if "error" in r else (f"{r['ms_per_step']:8.1f} ms/step | {r['img_s']:8.1f} img/s | "
                                                    f"mem {mem} | MFU {mfu}")
            print(f"train  | batch {batch:3d} {r['path']:10s} {r['precision']:13s} | {cols}")
        eager, fast = report["train"][-2:]
        print(f"train  | batch {batch:3d} fast / fp32-eager: {ratio(fast, eager)}")

    report["sample"] = bench_sample(args, device, args.sample_batch, args.ddpm_steps, fast_dtype)
    for r in report["sample"]:
        v = f"{r['img_s']:8.3f} img/s" if "img_s" in r else r["error"]
        print(f"sample | batch {args.sample_batch} {r['sampler']:26s} {r['precision']:13s} | {v} | "
              f"{ratio(r, report['sample'][-1])} DDPMPipeline")

    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
