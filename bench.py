"""
bench.py - measured speed, as ratios taken in one run: data loading, the training step, sampling.

    python bench.py --device cuda --preset base            # the README table: one GPU, 256x256, batch 8 and 32
    python bench.py --device cuda --preset base --compile  # also torch.compile the fast training path
    python bench.py --quick                                # tiny preset on the CPU in under a minute (smoke test)

Prints a table and writes bench.json: every number, the device, the date, and the peak FLOP/s behind MFU.
MFU = 3 x model.flops_per_image (forward + backward ~ 3 forwards) x images/s / the device's peak.
"""
import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline
from PIL import Image

import model

# dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s); --peak-tflops overrides
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def get_parser():
    p = argparse.ArgumentParser(description="benchmark data loading, training and sampling")
    # ---- what to run ----
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda|cpu")
    p.add_argument("--preset", default="base", help="UNet preset to time")
    p.add_argument("--image-size", type=int, default=256, help="image side in pixels")
    p.add_argument("--batch-sizes", default="8,32", help="training batch sizes, comma-separated")
    p.add_argument("--sample-batch", type=int, default=64, help="images per sampling batch")
    p.add_argument("--compile", action="store_true", help="add torch.compile to the fast training path")
    p.add_argument("--quick", action="store_true", help="tiny preset, 32 px, small batches: a CPU smoke test")
    # ---- measurement ----
    p.add_argument("--steps", type=int, default=20, help="timed training steps per configuration")
    p.add_argument("--ddpm-steps", type=int, default=1000, help="steps of the ddpm sampler and of DDPMPipeline")
    p.add_argument("--png-images", type=int, default=64, help="PNGs written (1024x1024, like NIH) to time decoding")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak TFLOP/s for MFU (default: datasheet bf16)")
    p.add_argument("--out", default="bench.json", help="where to write the numbers")
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat, warmup=True):
    """Median seconds of fn() over `repeat` runs, after one warm-up run (compilation, cuDNN autotune, allocator)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))

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


def bench_train(args, device, batch, fast, flops, peak):
    torch.manual_seed(0)
    unet = model.build_unet(args.image_size, args.preset).to(device).train()
    cuda = device.type == "cuda"
    if fast and cuda:
        unet = unet.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=fast and cuda)
    step_fn = torch.compile(unet) if fast and args.compile else unet
    amp = torch.autocast("cuda", torch.bfloat16) if fast and cuda else nullcontext()
    alpha_bar = model.make_schedule().alphas_cumprod.to(device)
    x0 = torch.randn(batch, 1, args.image_size, args.image_size, device=device)
    y = torch.randint(0, model.NULL_CLASS + 1, (batch,), device=device)

    def step():  # the same work as one train.py step: noise, predict eps, MSE, backward, clip, AdamW
        t = torch.randint(0, model.NUM_TIMESTEPS, (batch,), device=device)
        eps = torch.randn_like(x0)
        with amp:
            loss = F.mse_loss(step_fn(model.add_noise(x0, eps, t, alpha_bar), t, class_labels=y).sample.float(), eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    s = timed(step, device, args.steps)
    img_s = batch / s
    return {"batch": batch, "path": "fast" if fast else "fp32-eager", "ms_per_step": 1e3 * s, "img_s": img_s,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "mfu": 3 * flops * img_s / peak if peak else None}

# -----------------------------------------------------------------------------
# 3. sampling: our loop (dpm++ 25 steps with guidance; ddpm 1000) vs diffusers' DDPMPipeline on the same weights


def bench_sample(args, device, batch, ddpm_steps):
    torch.manual_seed(0)
    unet = model.build_unet(args.image_size, args.preset).to(device).eval()
    cuda = device.type == "cuda"
    labels = torch.arange(batch, device=device) % len(model.CLASSES)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    amp = torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext()
    fast_unet = unet.to(memory_format=torch.channels_last) if cuda else unet
    with amp:  # warm-up: the 1000-step runs below are long enough to time once, cold starts excluded
        model.sample(fast_unet, labels, "dpm++", 2, guidance=2.0, generators=gens)
    out = {}
    for name, sampler, steps, w in [("dpm++ 25, guidance 2", "dpm++", 25, 2.0), ("dpm++ 25, no guidance", "dpm++", 25, 1.0),
                                    (f"ddpm {ddpm_steps}", "ddpm", ddpm_steps, 1.0)]:
        def run():
            with amp:
                model.sample(fast_unet, labels, sampler, steps, guidance=w, generators=gens)
        out[name] = batch / timed(run, device, 1, warmup=False)
    # the peer: DDPMPipeline, fp32, every step one conditional forward (the class label is bound to the UNet)
    peer = model.build_unet(args.image_size, args.preset).to(device).eval()
    peer.load_state_dict(unet.state_dict())
    peer.forward = partial(peer.forward, class_labels=labels)
    pipe = DDPMPipeline(unet=peer, scheduler=model.make_schedule())
    pipe.set_progress_bar_config(disable=True)
    out[f"DDPMPipeline {ddpm_steps} fp32"] = batch / timed(
        lambda: pipe(batch_size=batch, num_inference_steps=ddpm_steps, output_type="np"), device, 1, warmup=False)
    return out


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.quick:
        args.preset, args.image_size, args.batch_sizes, args.sample_batch = "tiny", 32, "8", 4
        args.steps, args.png_images = min(args.steps, 5), min(args.png_images, 16)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: error: --device cuda: no CUDA device here (use --device cpu)")
    try:
        flops = model.flops_per_image(model.build_unet(args.image_size, args.preset), args.image_size)
        batches = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError as e:
        raise SystemExit(f"bench.py: error: {e}")
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
            r = bench_train(args, device, batch, fast, flops, peak)
            report["train"].append(r)
            mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "-"
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(f"train  | batch {batch:3d} {r['path']:10s} | {r['ms_per_step']:8.1f} ms/step | "
                  f"{r['img_s']:8.1f} img/s | mem {mem} | MFU {mfu}")
        eager, fast = report["train"][-2:]
        print(f"train  | batch {batch:3d} fast / fp32-eager: x{fast['img_s'] / eager['img_s']:.2f}")

    report["sample_img_s"] = bench_sample(args, device, args.sample_batch, args.ddpm_steps)
    peer = report["sample_img_s"][f"DDPMPipeline {args.ddpm_steps} fp32"]
    for k, v in report["sample_img_s"].items():
        print(f"sample | batch {args.sample_batch} {k:24s} | {v:8.3f} img/s | x{v / peer:.1f} DDPMPipeline")

    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
