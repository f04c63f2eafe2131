"""
bench.py - measured speed, as ratios taken in one run: data loading, train.py itself (one run per row), sampling.

    python instruments/bench.py --gpu-check --out-dir gpu_check    # README's GPU table + a 256 px, < 8 min on one H100
    python instruments/bench.py --device cuda --preset base --compile  # the training and sampling tables alone
    python instruments/bench.py --quick                            # tiny preset on the CPU: a smoke test
    python instruments/bench.py --data-dir data/kermany64 --image-size 64 --preset tiny4 --batch-sizes 32  # your data

Writes bench.json (every number, the device, the date, the peak FLOP/s behind MFU) and bench.md (the tables, as
printed) into --out-dir. MFU = 3 x flops_per_image (forward + backward ~ 3 forwards) x img/s / dense bf16 peak.
"""
import argparse
import copy
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline, UNet2DModel
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]  # the pipeline scripts
sys.path.insert(0, str(ROOT))  # model.py
import model

# dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s); --peak-tflops overrides
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}
PRECISION = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}  # autocast dtype: name


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


def flops_per_image(unet, image_size):
    """Forward-pass FLOPs for one image (a multiply-add counts 2), counted on the meta device: no memory, no time."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        meta, t = UNet2DModel.from_config(unet.config), torch.zeros(1, dtype=torch.long)
        y = t  # a class id, or a label set
        if isinstance(unet.class_embedding, model.MultiHotEmbedding):
            meta, y = model.multi_hot(meta), torch.zeros(1, unet.config.num_class_embeds)
        meta(torch.zeros(1, 1, image_size, image_size), t, class_labels=y)
    return counter.get_total_flops()


def guarded(fn, device):
    """fn(), or {"error": "OOM"} where the configuration does not fit: the others still run. Any other error stops."""
    try:
        return fn()
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is a RuntimeError; older messages say "out of memory"
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in str(e):
            raise
    gc.collect()  # out of the except block: the traceback no longer holds the frames, nor their tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"error": "OOM"}


def run_script(cmd, log):
    """python <a pipeline script> args, as a user runs it, output into log -> (exit code, seconds)."""
    print(f"$ python {' '.join(cmd)}", file=log, flush=True)
    t0 = time.perf_counter()
    exit_code = subprocess.run([sys.executable, str(ROOT / cmd[0]), *cmd[1:]], stdout=log,
                               stderr=subprocess.STDOUT).returncode
    return exit_code, time.perf_counter() - t0


def bench_train(args, data, batch, flags, work):
    """train.py itself on `data` with `flags`: --timed-steps steps of warm-up (compile, cuDNN autotune), then as many
    timed by train.py's own clock (the img/s of its last metrics.csv row). A run out of memory: an OOM row."""
    if "--fast-path" in flags and args.device == "cpu" and torch.__version__ < (2, 4):
        return {"error": "needs torch 2.4"}  # fused AdamW on a CPU came with torch 2.4: train.py refuses it before
    run, n = os.path.join(work, "run"), args.timed_steps
    shutil.rmtree(run, ignore_errors=True)
    cmd = ["train.py", "--data-dir", data, "--out-dir", run, "--preset", args.preset, "--image-size",
           str(args.image_size), "--batch-size", str(batch), "--max-steps", str(2 * n), "--log-every", str(n),
           "--eval-every", "0", "--sample-every", "0", "--save-every", "0", "--device", args.device, *flags]
    with open(os.path.join(work, "train.log"), "w+") as log:
        exit_code, _ = run_script(cmd, log)
        log.seek(0)
        out = log.read()
    if exit_code:
        if "out of memory" in out:  # torch.cuda.OutOfMemoryError, or an older torch's RuntimeError
            return {"error": "OOM"}
        raise SystemExit(f"bench.py: error: train.py {' '.join(flags)} failed (exit {exit_code}): "
                         f"{out.strip().splitlines()[-1] if out.strip() else ''}")
    img_s = float(np.genfromtxt(os.path.join(run, "metrics.csv"), delimiter=",", names=True)["img_per_s"][-1])
    peak = re.search(r"peak CUDA memory ([0-9.]+) GiB", out)
    return {"ms_per_step": 1e3 * batch / img_s, "img_s": img_s, "peak_mem_gib": float(peak[1]) if peak else None,
            "mfu": 3 * args.flops * img_s / args.peak if args.peak else None}


def whole_loop(args, data, work):
    """--gpu-check: train.py, sample.py and export.py on the demo data, run here as a user runs them (bench.py imports
    model.py alone), into gpu_check.log (what a time limit cuts short leaves is there); metrics.csv and the grid
    copied out."""
    steps, dev, out, rows = args.train_steps, ["--device", args.device], args.out_dir, []
    run = os.path.join(work, "loop")  # ckpt.pt (1.8 GB at base) and the export stay out of --out-dir
    with open(os.path.join(out, "gpu_check.log"), "a") as log:
        for cmd in (["train.py", "--data-dir", data, "--out-dir", run, "--preset", args.preset, "--batch-size", "8",
                     "--max-steps", str(steps), "--log-every", "10", "--eval-every", str(max(1, steps // 3)),
                     "--sample-every", str(steps), "--save-every", str(steps), *dev],
                    ["sample.py", "--ckpt", run, "--class", "all", "--n", "4", "--out", os.path.join(work, "s"), *dev],
                    ["instruments/export.py", "--ckpt", run]):
            exit_code, seconds = run_script(cmd, log)
            rows.append({"command": " ".join(cmd).replace(work, "$WORK"), "seconds": seconds, "exit": exit_code})
            if exit_code:
                return {"commands": rows}  # the log says why; bench.md shows the exit code
        shutil.copy(os.path.join(run, "metrics.csv"), os.path.join(out, "metrics.csv"))
        shutil.copy(os.path.join(run, f"samples_step{steps:06d}.png"), os.path.join(out, "samples.png"))
    m = np.genfromtxt(os.path.join(out, "metrics.csv"), delimiter=",", names=True)
    lo, hi = np.log10(np.nanmin([m["loss"], m["val_loss"]])), np.log10(np.nanmax([m["loss"], m["val_loss"]]))
    W, H, pad = 640, 360, 50  # loss_curve.png: loss and val loss by step, log y, drawn with PIL as curve.py draws
    im = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(im)
    draw.rectangle([pad, pad, W - pad, H - pad], outline="black")
    draw.text((pad, 15), f"train.py loss (blue), val loss (red), log scale {10 ** lo:.3g} to {10 ** hi:.3g}, "
              f"steps 0-{m['step'].max():.0f}", fill="black")
    for col, color in (("loss", (31, 119, 180)), ("val_loss", (214, 39, 40))):
        ok = np.isfinite(m[col])
        pts = list(zip(pad + (W - 2 * pad) * m["step"][ok] / m["step"].max(),
                       H - pad - (H - 2 * pad) * (np.log10(m[col][ok]) - lo) / max(hi - lo, 1e-6)))
        draw.line(pts, fill=color, width=2)
        for px, py in pts:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
    model.replace_file(os.path.join(out, "loss_curve.png"), lambda tmp: im.save(tmp, format="PNG"))
    return {"commands": rows, **{col: m[col][np.isfinite(m[col])][[0, -1]].tolist() for col in ("loss", "val_loss")}}


def main(argv=None):
    p = argparse.ArgumentParser(description="speed: data, training, sampling", formatter_class=model.HelpFormatter)
    # ---- what to run ----
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda|cpu")
    p.add_argument("--preset", default="base", help="UNet preset to time")
    p.add_argument("--image-size", type=int, default=256, help="image side in pixels")
    p.add_argument("--batch-sizes", default="8,32", help="training batch sizes, comma-separated")
    p.add_argument("--sample-batch", type=int, default=64, help="images per sampling batch")
    p.add_argument("--compile", action="store_true", help="add the + compile row at each batch size")
    p.add_argument("--gpu-check", action="store_true", help="base, 256 px, batch 8 and 32, every row, sampling "
                   "batch 8, and first train.py + sample.py on the demo data (with --quick: tiny, on a CPU)")
    p.add_argument("--data-dir", default=None, help="prepared data train.py is timed on (default: prepare_data.py "
                   "--demo at --image-size, in a temporary folder)")
    p.add_argument("--train-steps", type=int, default=300, help="--gpu-check: train.py steps of the whole loop")
    p.add_argument("--quick", action="store_true", help="tiny preset, 32 px, small batches: a CPU smoke test")
    # ---- measurement ----
    p.add_argument("--timed-steps", "--steps", type=int, default=20, help="train.py steps timed per configuration "
                   "(after as many to warm up)")
    p.add_argument("--ddpm-steps", type=int, default=1000, help="steps of the ddpm sampler and of DDPMPipeline")
    p.add_argument("--png-images", type=int, default=64, help="PNGs written (1024x1024, like NIH) to time decoding")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: datasheet bf16)")
    p.add_argument("--out-dir", default=".", help="where bench.json, bench.md (and --gpu-check's files) go")
    args = p.parse_args(argv)
    if args.gpu_check:  # the README's GPU table; sampling batch 8: DDPMPipeline's 1000 steps in ~1 min (estimated)
        args.preset, args.image_size, args.batch_sizes, args.sample_batch = "base", 256, "8,32", 8
        args.compile = not args.quick
    if args.quick:
        args.preset, args.image_size, args.batch_sizes, args.sample_batch = "tiny", 32, "8", 4
        args.timed_steps, args.png_images = min(args.timed_steps, 5), min(args.png_images, 16)
    device = torch.device(args.device)
    model.set_threads(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: error: --device cuda: no CUDA device here (use --device cpu)")
    try:
        args.flops = flops = flops_per_image(model.build_unet(args.image_size, args.preset), args.image_size)
        batches = [int(b) for b in args.batch_sizes.split(",")]
        os.makedirs(args.out_dir, exist_ok=True)
    except (ValueError, OSError) as e:
        raise SystemExit(f"bench.py: error: {e}")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as train.py: cuDNN times its conv algorithms per shape
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(model.auto_amp(device))  # as train.py and sample.py
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAK_BF16.items() if k in name), None)
    # the demo data and train.py's runs; removed after the training table, or at exit (an error on the way)
    args.peak, scratch = peak, tempfile.TemporaryDirectory(prefix="bench-")
    work = scratch.name
    report = {"device": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "preset": args.preset, "image_size": args.image_size, "flops_per_image_fwd": flops,
              "peak_flops": peak, "peak_source": "--peak-tflops" if args.peak_tflops else "datasheet dense bf16"}
    md = []  # bench.md; its cells: "-" where a row has no figure (OOM, no GPU memory figure, no known peak)
    ratio = lambda a, b: f"x{a['img_s'] / b['img_s']:.2f}" if "img_s" in a and "img_s" in b else "-"  # throughputs
    cell = lambda r, key, spec: format(r[key], spec) if r and r.get(key) is not None else "-"

    def say(*lines):  # printed, and bench.md rewritten: a run cut short by a time limit leaves what it measured
        print(*lines, sep="\n", flush=True)
        md.extend(lines)
        model.replace_file(os.path.join(args.out_dir, "bench.md"), lambda f: Path(f).write_text("\n".join(md) + "\n"))
    say(f"**{name}**, torch {torch.__version__}, {report['date']}: {args.preset} {args.image_size} px, "
        f"{flops / 1e9:.1f} GFLOP per forward, peak {peak} FLOP/s ({report['peak_source']})\n")

    # ---- 0. the data train.py is timed on, and (--gpu-check) train.py and sample.py whole on it
    data = args.data_dir or os.path.join(work, "data")
    log_name = "gpu_check.log" if args.gpu_check else "prepare.log"
    with open(os.path.join(args.out_dir if args.gpu_check else work, log_name), "w") as log:
        cmd = ["prepare_data.py", "--demo", "--out", data, "--size", str(args.image_size)]
        exit_code, seconds = (0, 0.0) if args.data_dir else run_script(cmd, log)
    if exit_code:
        raise SystemExit(f"bench.py: error: prepare_data.py --demo failed (exit {exit_code}); see {log.name}")
    if args.gpu_check:  # first: whatever fails or runs out of time later, this part is in --out-dir
        report["loop"] = loop = whole_loop(args, data, work)
        loop["commands"].insert(0, {"command": " ".join(cmd).replace(work, "$WORK"), "seconds": seconds, "exit": 0})
        say("| the whole loop on this device (its output: gpu_check.log) | seconds | exit |\n|---|---:|---:|",
            *(f"| `python {r['command']}` | {r['seconds']:.0f} | {r['exit']} |" for r in loop["commands"]))
        if "loss" in loop:
            say("\ntrain.py: loss {:.4f} -> {:.4f}, val loss {:.4f} -> {:.4f} (loss_curve.png, metrics.csv); EMA "
                "samples of the last step: samples.png".format(*loop["loss"], *loop["val_loss"]))

    # ---- 1. data: decoding a full-size PNG (what prepare_data.py does once per image) vs reading the uint8 cache
    rng, n_png, size = np.random.default_rng(0), args.png_images, args.image_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"{i:05d}.png") for i in range(n_png)]
        for p in paths:  # smooth random "films": compress like real CXRs, unlike white noise
            Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).resize((1024, 1024), Image.BICUBIC).save(p)
        t0 = time.perf_counter()
        decoded = [np.asarray(Image.open(p).convert("L").resize((size, size), Image.LANCZOS)) for p in paths]
        png_per_s = n_png / (time.perf_counter() - t0)  # one worker: this is also the cache build rate per worker
        np.save(os.path.join(tmp, "cache.npy"), np.stack(decoded))
        cache = np.load(os.path.join(tmp, "cache.npy"), mmap_mode="r")
        n_read, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 1.0:  # random batches, as the training loader draws them
            rows = np.sort(rng.choice(n_png, min(batches[0], n_png), replace=False))
            n_read += len(torch.from_numpy(cache[rows]).float().div_(127.5).sub_(1).unsqueeze(1))  # (B, 1, H, W)
        cache_per_s = n_read / (time.perf_counter() - t0)
    report["data"] = {"png_decode_img_s_per_worker": png_per_s, "cache_img_s_per_worker": cache_per_s,
                      "cache_over_png": cache_per_s / png_per_s}
    say(f"\ndata: PNG decode+resize {png_per_s:.0f} img/s/worker, cache {cache_per_s:.0f} img/s/worker: "
        f"x{cache_per_s / png_per_s:.0f}\n")

    # ---- 2. train.py, one speed-up more per row (its flags; bench_train runs it)
    report["train"] = []
    say("| batch | train.py | precision | ms/step | img/s | peak GiB | MFU | over fp32 eager |\n"
        "|---:|---|---|---:|---:|---:|---:|---:|")
    amp_flag = model.auto_amp(device) if amp else "bf16"  # the CPU: bf16 autocast, as train.py --amp bf16
    configs = [("fp32 eager", ["--amp", "off", "--no-fast-path"]),
               ("+ autocast", ["--amp", amp_flag, "--no-fast-path"]),
               ("+ channels_last, fused AdamW", ["--amp", amp_flag, "--fast-path"]),
               ("+ compile", ["--amp", amp_flag, "--fast-path", "--compile"])][:4 if args.compile else 3]
    for batch in batches:
        for level, (config, flags) in enumerate(configs):
            r = {"batch": batch, "config": config, "precision": PRECISION[(amp or torch.bfloat16) if level else None],
                 "flags": " ".join(flags), **bench_train(args, data, batch, flags, work)}
            report["train"].append(r)
            say(f"| {batch} | {config} (`{r['flags']}`) | {r['precision']} | "
                f"{r.get('error') or cell(r, 'ms_per_step', '.1f')} | {cell(r, 'img_s', '.1f')} | "
                f"{cell(r, 'peak_mem_gib', '.1f')} | {cell(r, 'mfu', '.1%')} | "
                f"{ratio(r, report['train'][-1 - level])} |")
    scratch.cleanup()

    # ---- 3. sampling as sample.py does it (the default sampler with and without guidance; ddpm) vs DDPMPipeline
    torch.manual_seed(0)
    batch, ddpm = args.sample_batch, args.ddpm_steps
    unet = model.build_unet(args.image_size, args.preset).to(device).eval()
    labels = torch.arange(batch, device=device) % len(model.CLASSES)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    peer = copy.deepcopy(unet)  # DDPMPipeline, fp32, every step one conditional forward (the label is bound)
    peer.forward = partial(peer.forward, class_labels=labels)
    pipe = DDPMPipeline(unet=peer, scheduler=model.make_schedule())
    pipe.set_progress_bar_config(disable=True)
    theirs = lambda n_steps: pipe(batch_size=batch, num_inference_steps=n_steps, output_type="np")

    def ours(sampler, w, n_steps):  # sample.py's autocast
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            model.sample(unet, labels, sampler, n_steps, guidance=w, generators=gens)
    report["sample"] = s = []
    d, n, w = model.DEFAULT_SAMPLER, model.DEFAULT_STEPS[model.DEFAULT_SAMPLER], model.DEFAULT_GUIDANCE
    for what, precision, run, steps in [(f"{d} {n}, guidance {w}", PRECISION[amp], partial(ours, d, w), n),
                                        (f"{d} {n}, no guidance", PRECISION[amp], partial(ours, d, 1.0), n),
                                        (f"ddpm {ddpm}", PRECISION[amp], partial(ours, "ddpm", 1.0), ddpm),
                                        (f"DDPMPipeline {ddpm}", "fp32", theirs, ddpm)]:
        # warm-up: 2 steps of the same shapes; the timed runs are long enough to time once
        s.append({"sampler": what, "precision": precision, **guarded(
            lambda: {"img_s": batch / timed(partial(run, steps), device, 1, warmup=partial(run, 2))}, device)})
    say(f"\n| sampler, batch {args.sample_batch} | precision | img/s | over DDPMPipeline |\n|---|---|---:|---:|",
        *(f"| {r['sampler']} | {r['precision']} | {r.get('error') or cell(r, 'img_s', '.3f')} | {ratio(r, s[-1])} |"
          for r in s))

    # ---- 4. the speed targets (one H100/H200, base UNet, 256 px) beside this run's figures; never asserted
    best = {b: max([r for r in report["train"] if r["batch"] == b and "img_s" in r], key=lambda r: r["img_s"],
                   default=None) for b in (8, 32)}
    eager = next((r for r in report["train"] if r["batch"] == 32 and r["config"] == "fp32 eager"), {})
    say("\n| target (one H100/H200, base, 256 px) | measured | target |\n|---|---:|---|",
        f"| MFU at batch 32, fastest row | {cell(best[32], 'mfu', '.1%')} | >= 45% |",
        f"| batch 32, fastest row over fp32 eager | {ratio(best[32] or {}, eager)} | >= x3 |",
        f"| img/s at batch 8, fastest row | {cell(best[8], 'img_s', '.1f')} | >= 120 |",
        f"| sampling: {s[0]['sampler']} over {s[-1]['sampler']} | {ratio(s[0], s[-1])} | >= x40 at equal label "
        "fidelity (fidelity measured on a CPU at 32 px only: docs/results.md) |")
    model.replace_file(os.path.join(args.out_dir, "bench.json"),
                       lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    print(f"wrote {args.out_dir}/bench.json and bench.md")
    return report


if __name__ == "__main__":
    main()
