"""
curve.py - quality against training time: score every EMA snapshot of a run, then plot runs side by side.

    python train.py ... --snapshot-every 500 --out-dir runs/a           # keeps runs/a/snapshots/ema_step*.pt
    python curve.py --run runs/a --data-dir data/pmnist --sampler ddim-2m --steps 25 --guidance 1.5
    python curve.py --plot runs/a/curve.csv runs/b/curve.csv --out assets/quality_vs_compute.png

Scoring a snapshot = sample.py (--n images of every class in the test split) + evaluate.py --no-utility, so the
numbers are the ones those scripts give. Appends one row per snapshot to <run>/curve.csv (snapshots already in it
are skipped: run it again while training goes on). The plot: label fidelity over the real rate, and realism (FD
ratio, log scale), against the run's training minutes, with the targets drawn in.
"""
import argparse
import glob
import os
import shutil

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

import evaluate
import sample
from model import HelpFormatter

FIDELITY_TARGET, REALISM_TARGET = 0.9, 3.0  # issue targets: fidelity >= 0.9 x real, FD <= 3 x the real floor
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def score(args):
    csv, work = os.path.join(args.run, "curve.csv"), os.path.join(args.run, "curve")
    done = set(pd.read_csv(csv)["snapshot"]) if os.path.exists(csv) else set()
    snaps = sorted(glob.glob(os.path.join(args.run, "snapshots", "ema_step*.pt")))
    if not snaps:
        raise SystemExit(f"curve.py: error: --run {args.run}: no snapshots/ema_step*.pt (train with --snapshot-every)")
    if not os.path.exists(os.path.join(args.data_dir, "test.csv")):
        raise SystemExit(f"curve.py: error: --data-dir {args.data_dir}: no test.csv (run prepare_data.py first)")
    classes = sorted(pd.read_csv(os.path.join(args.data_dir, "test.csv"))["label"].unique())
    for snap in [s for s in snaps if os.path.basename(s) not in done]:
        samples = os.path.join(work, "samples")
        shutil.rmtree(samples, ignore_errors=True)
        sample.main(["--ckpt", snap, "--n", str(args.n), "--out", samples, "--sampler", args.sampler,
                     "--guidance", str(args.guidance), "--batch-size", str(args.batch_size)]
                    + (["--steps", str(args.steps)] if args.steps else []) + [a for c in classes for a in ("--class", c)])
        R = evaluate.main(["--data-dir", args.data_dir, "--samples", samples, "--size", str(args.size),
                           "--out", os.path.join(work, "report"), "--no-utility"])
        ckpt = evaluate.torch.load(snap, map_location="cpu", weights_only=True)  # step and training seconds
        P = R["per_class"]
        seconds = ckpt["step"] * args.seconds_per_step if args.seconds_per_step else ckpt["time_s"]
        row = {"snapshot": os.path.basename(snap), "step": ckpt["step"], "minutes": seconds / 60,
               "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance,
               "fidelity_over_real_worst": min(P[c]["fidelity"] / max(P[c]["accuracy"], 1e-3) for c in classes),
               "fd_ratio": R["summary"]["fd_ratio"], "fd_ratio_worst": max(P[c]["fd_ratio"] for c in classes),
               "kid": R["summary"]["kid"]["synthetic"]["mean"],
               **{f"fidelity {c}": P[c]["fidelity"] for c in classes}, **{f"fd_ratio {c}": P[c]["fd_ratio"] for c in classes}}
        pd.DataFrame([row]).to_csv(csv, mode="a", header=not os.path.exists(csv), index=False)
        print(f"curve.py: {row['snapshot']}: {row['minutes']:.1f} min, worst fidelity/real "
              f"{row['fidelity_over_real_worst']:.3f}, FD ratio {row['fd_ratio']:.2f} -> {csv}")


def plot(csvs, labels, out, W=560, H=300, pad=60):
    """Two panels side by side, drawn with PIL: y = fidelity over real (linear) and FD ratio (log), x = minutes."""
    runs = [pd.read_csv(c).sort_values("minutes") for c in csvs]
    xmax = max(r["minutes"].max() for r in runs) * 1.05
    canvas = Image.new("RGB", (2 * W, H + 40), "white")
    draw = ImageDraw.Draw(canvas)
    panels = [("label fidelity / real (worst class)", "fidelity_over_real_worst", 0.0, 1.1, False, FIDELITY_TARGET),
              ("realism: FD / real floor (mean over classes, log)", "fd_ratio", 0.7,
               max(50.0, max(r["fd_ratio"].max() for r in runs)), True, REALISM_TARGET)]
    for k, (title, col, lo, hi, log, target) in enumerate(panels):
        x0, y0, x1, y1 = k * W + pad, 25, (k + 1) * W - 15, H - 10
        f = (lambda v: np.log(v)) if log else (lambda v: v)
        X = lambda m: x0 + (x1 - x0) * m / xmax
        Y = lambda v: y1 - (y1 - y0) * (f(np.clip(v, lo, hi)) - f(lo)) / (f(hi) - f(lo))
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, 5), title, fill="black")
        ticks = [v for v in (0.7, 1, 2, 3, 5, 10, 20, 50, 100) if lo <= v <= hi] if log else np.arange(0, 1.01, 0.2)
        for v in ticks:
            draw.line([x0 - 4, Y(v), x0, Y(v)], fill="black")
            draw.text((x0 - 40, Y(v) - 6), f"{v:g}", fill="black")
        for m in np.arange(0, xmax, 10 if xmax > 40 else 5):  # round minutes
            draw.line([X(m), y1, X(m), y1 + 4], fill="black")
            draw.text((X(m) - 8, y1 + 6), f"{m:.0f}", fill="black")
        draw.text(((x0 + x1) // 2 - 60, y1 + 20), "training minutes", fill="black")
        draw.line([x0, Y(target), x1, Y(target)], fill=(150, 150, 150), width=1)
        draw.text((x1 - 45, Y(target) - 14), "target", fill=(120, 120, 120))
        for i, r in enumerate(runs):
            pts = [(X(m), Y(v)) for m, v in zip(r["minutes"], r[col])]
            draw.line(pts, fill=COLORS[i % len(COLORS)], width=2) if len(pts) > 1 else None
            for px, py in pts:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=COLORS[i % len(COLORS)])
            if k == 0:
                draw.text((x0 + 10, y1 - 16 - 14 * (len(runs) - 1 - i)), labels[i], fill=COLORS[i % len(COLORS)])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    canvas.save(out + ".tmp", format="PNG")
    os.replace(out + ".tmp", out)
    print(f"curve.py: wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description="quality against training time, from a run's EMA snapshots",
                                formatter_class=HelpFormatter)
    # ---- score a run ----
    p.add_argument("--run", help="run folder with snapshots/ (train.py --snapshot-every)")
    p.add_argument("--data-dir", help="prepare_data.py output the run was trained on")
    p.add_argument("--size", type=int, default=32, help="image size for evaluate.py")
    p.add_argument("--n", type=int, default=200, help="synthetic images per class and snapshot")
    p.add_argument("--sampler", default="ddim-2m", help="sample.py --sampler")
    p.add_argument("--steps", type=int, default=None, help="sample.py --steps (default: the sampler's)")
    p.add_argument("--guidance", type=float, default=sample.GUIDANCE, help="sample.py --guidance")
    p.add_argument("--batch-size", type=int, default=100, help="sample.py --batch-size")
    p.add_argument("--seconds-per-step", type=float, default=None, help="minutes = step x this (a run timed alone), "
                   "instead of the run's own clock (a run that shared the CPU)")
    # ---- plot runs ----
    p.add_argument("--plot", nargs="+", metavar="CSV", help="curve.csv files to draw into one figure")
    p.add_argument("--labels", nargs="+", help="legend entries for --plot (default: the run folder names)")
    p.add_argument("--out", default="curve.png", help="the figure --plot writes")
    args = p.parse_args(argv)
    if args.plot:
        missing = [c for c in args.plot if not os.path.exists(c)]
        if missing:
            raise SystemExit(f"curve.py: error: --plot {missing[0]}: no such file")
        labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(c))) for c in args.plot]
        if len(labels) != len(args.plot):
            raise SystemExit(f"curve.py: error: --labels: {len(labels)} labels for {len(args.plot)} files")
        return plot(args.plot, labels, args.out)
    if not args.run or not args.data_dir:
        raise SystemExit("curve.py: error: give --run and --data-dir to score a run, or --plot CSV... to draw")
    score(args)


if __name__ == "__main__":
    main()
