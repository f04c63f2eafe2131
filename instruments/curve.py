"""
curve.py - quality against training time: score every EMA snapshot of a run, then plot runs side by side.

    python train.py ... --snapshot-every 500 --out-dir runs/a           # keeps runs/a/snapshots/ema_step*.pt
    python instruments/curve.py --run runs/a --data-dir data/pmnist --sampler ddim-2m --steps 25 --guidance 1.5
    python instruments/curve.py --plot runs/a/curve.csv runs/b/curve.csv --out assets/quality_vs_compute.png
    python instruments/curve.py --rare Pneumonia --data-dir data/pmnist32 --k 4 8 16 32 --pool cut --out-dir runs/rare

Scoring a snapshot runs `python sample.py` (--n images of every class in the test split) and `python
instruments/evaluate.py --no-utility` as a user would, so the numbers are the ones those commands give. Appends
one row per snapshot to <run>/curve.csv (snapshots already in it are skipped: run it again while training goes on).
The plot: label fidelity over the real rate, realism (FD ratio, log scale) and the share of grainy films against the
run's training minutes, with the targets drawn in.

--rare CLASS: does augmenting a rare class help? For each k, the class is cut to k training films (val and test
untouched; --pool cut keeps the films cut away, unlabelled, for the generator), the generator is trained on that
split, sample.py draws synthetic films of the class (--n-synthetic), and evaluate.py --baselines --ceiling trains
classifiers on the real films (as they are, class-weighted, augmented, pseudo-labelled), on real + synthetic films
and on every real film of the uncut data (the ceiling), all scored on the same real test films: the class's AUC and
sensitivity at --specificity, with 95% intervals over test resampling and classifier seeds; the gain of the best
synthetic arm over the best baseline, the ceiling gap and the share of it closed ("no room" under NO_ROOM). Rows go
to <out-dir>/rare.csv (one per k and settings), the plot of this call's rows (AUC against k) to <out-dir>/rare.png.
Rerunnable: finished generators, samples and classifiers are reused, so trying other settings costs only those
(<out-dir>/k<k>/report/ holds the report of the last settings scored at that k; rare.csv keeps every setting's row).
"""
import argparse
import glob
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]  # the pipeline's scripts and model.py
sys.path.insert(0, str(ROOT))
from model import DEFAULT_GUIDANCE, HelpFormatter, classes_of, labels_of, load_checkpoint, replace_file

FIDELITY_TARGET, REALISM_TARGET = 0.9, 3.0  # >= 0.9 x real; FD <= 3 x the floor
NO_ROOM = 0.02  # --rare: a ceiling gap (AUC) under this is "no room": nothing for synthetic films to close
GRAINY_REAL = 5  # % of real films evaluate.py calls grainy (its GRAINY_Q = 95): where a generator's line belongs
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def run(script, *argv):
    """python <script> argv, as a user runs it; its own one-line error (stderr) ends curve.py too."""
    cmd = [sys.executable, str(ROOT / script), *map(str, argv)]
    if subprocess.run(cmd).returncode:
        raise SystemExit(f"curve.py: error: {shlex.join(cmd[1:])} failed (its message is above)")


def evaluated(*argv):  # instruments/evaluate.py's report.json, read back
    out = argv[argv.index("--out") + 1]
    run("instruments/evaluate.py", *argv)
    return json.loads((Path(out) / "report.json").read_text())


def cache_size(data_dir):  # the side of the cached films, as prepare_data.py wrote them; None without a cache
    cache = os.path.join(data_dir, "cache.npy")
    return np.load(cache, mmap_mode="r").shape[1] if os.path.isfile(cache) else None


def score(args):
    csv, work = os.path.join(args.run, "curve.csv"), os.path.join(args.run, "curve")
    done = set(pd.read_csv(csv)["snapshot"]) if os.path.exists(csv) else set()
    snaps = sorted(glob.glob(os.path.join(args.run, "snapshots", "ema_step*.pt")))
    if not snaps:
        raise SystemExit(f"curve.py: error: --run {args.run}: no snapshots/ema_step*.pt (train with --snapshot-every)")
    if not os.path.exists(os.path.join(args.data_dir, "test.csv")):
        raise SystemExit(f"curve.py: error: --data-dir {args.data_dir}: no test.csv (run prepare_data.py first)")
    classes = sorted(pd.read_csv(os.path.join(args.data_dir, "test.csv"))["label"].dropna().unique())  # not unlabelled
    multi = labels_of(args.data_dir) == "multi"  # label sets: --n films per finding and No Finding, in the training
    ask = (["--match-train", int(args.n) * (len(classes_of(args.data_dir)) + 1)] if multi  # split's label sets;
           else [a for c in classes for a in ("--class", c)])  # scored per finding
    far = lambda ratios: max(ratios, key=lambda r: abs(math.log(r)) if r > 0 else math.inf)  # furthest from real
    for snap in [s for s in snaps if os.path.basename(s) not in done]:
        samples = os.path.join(work, "samples")
        shutil.rmtree(samples, ignore_errors=True)
        run("sample.py", "--ckpt", snap, "--n", args.n, "--out", samples, "--sampler", args.sampler,
            "--guidance", args.guidance, "--batch-size", args.batch_size,
            *(["--steps", args.steps] if args.steps else []), *ask)
        report = evaluated("--data-dir", args.data_dir, "--samples", samples, "--size", args.size,
                           "--out", os.path.join(work, "report"), "--no-utility", *shlex.split(args.evaluate_args))
        ckpt = load_checkpoint(snap)  # step and training seconds
        per_class = report["per_class"]
        if multi:  # the findings (and No Finding) with synthetic and real films
            classes = [c for c, d in per_class.items() if d["n_synthetic"] and d["n_real"]]
        seconds = ckpt["step"] * args.seconds_per_step if args.seconds_per_step else ckpt["time_s"]
        row = {"snapshot": os.path.basename(snap), "step": ckpt["step"], "minutes": seconds / 60,
               "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance,
               "fidelity_over_real_worst": min(per_class[c]["fidelity"] / max(per_class[c]["accuracy"], 1e-3)
                                               for c in classes),
               "fd_ratio": report["summary"]["fd_ratio"],
               "fd_ratio_worst": max(per_class[c]["fd_ratio"] for c in classes),
               "kid": report["summary"]["kid"]["synthetic"]["mean"],
               "grain_ratio": report["summary"]["grain"]["synthetic"]["mean"],
               "grain_ratio_worst": far(per_class[c]["grain"]["synthetic"]["mean"] for c in classes),
               "gradient_ratio_worst": far(per_class[c]["gradient"]["synthetic"]["mean"] for c in classes),
               "grainy_pct_worst": 100 * max(per_class[c]["grainy"]["synthetic"]["mean"] for c in classes),
               **{f"fidelity {c}": per_class[c]["fidelity"] for c in classes},
               **{f"fd_ratio {c}": per_class[c]["fd_ratio"] for c in classes}}
        pd.DataFrame([row]).to_csv(csv, mode="a", header=not os.path.exists(csv), index=False)
        print(f"curve.py: {row['snapshot']}: {row['minutes']:.1f} min, worst fidelity/real "
              f"{row['fidelity_over_real_worst']:.3f}, FD ratio {row['fd_ratio']:.2f}, worst grain ratio "
              f"{row['grain_ratio_worst']:.2f}, grainy films {row['grainy_pct_worst']:.0f}% -> {csv}")


def chart(lines, panels, xlabel, out, log_x=False, W=560, H=300, pad=60):
    """Panels side by side, drawn with PIL. lines: (label, x, {column: y}, {column: (lo, hi)}); panels: (title,
    column, y low, y high, log y, target or (value, its name) or None). x is minutes from 0, or k on a log scale."""
    xs = np.concatenate([np.asarray(x, float) for _, x, _, _ in lines])
    xlo, xhi = (xs.min() / 1.3, xs.max() * 1.3) if log_x else (0, xs.max() * 1.05)
    fx = np.log if log_x else (lambda v: v)
    canvas = Image.new("RGB", (len(panels) * W, H + 40), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (title, col, lo, hi, log, target) in enumerate(panels):
        x0, y0, x1, y1 = k * W + pad, 25, (k + 1) * W - 15, H - 10
        f = np.log if log else (lambda v: v)
        X = lambda m: x0 + (x1 - x0) * (fx(m) - fx(xlo)) / (fx(xhi) - fx(xlo))
        Y = lambda v: y1 - (y1 - y0) * (f(np.clip(v, lo, hi)) - f(lo)) / (f(hi) - f(lo))
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, 5), title, fill="black")
        step = next(v for v in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 1e9) if (hi - lo) / v <= 8)  # <= 9 ticks
        yticks = ([v for v in (0.7, 1, 2, 3, 5, 10, 20, 50, 100) if lo <= v <= hi] if log
                  else np.arange(np.ceil(lo / step - 1e-9) * step, hi + 1e-9, step))
        for v in yticks:
            draw.line([x0 - 4, Y(v), x0, Y(v)], fill="black")
            draw.text((x0 - 40, Y(v) - 6), f"{round(v, 6) + 0.0:.3g}", fill="black")  # + 0.0: no "-0"
        xticks = sorted(set(xs)) if log_x else np.arange(0, xhi, 10 if xhi > 40 else 5)  # k as drawn; round minutes
        for m in xticks:
            draw.line([X(m), y1, X(m), y1 + 4], fill="black")
            draw.text((X(m) - 8, y1 + 6), f"{m:.0f}", fill="black")
        draw.text(((x0 + x1) // 2 - 60, y1 + 20), xlabel, fill="black")
        if target is not None:
            target, name = target if isinstance(target, tuple) else (target, "target")
            draw.line([x0, Y(target), x1, Y(target)], fill=(150, 150, 150), width=1)
            draw.text((x1 - 6 * len(name) - 9, Y(target) - 14), name, fill=(120, 120, 120))
        for i, (label, x, ys, bars) in enumerate(lines):
            color = COLORS[i % len(COLORS)]
            ok = [n for n, v in enumerate(ys[col]) if np.isfinite(v)]  # a figure that could not be computed: no point
            pts = [(X(np.asarray(x)[n]), Y(np.asarray(ys[col])[n])) for n in ok]
            draw.line(pts, fill=color, width=2) if len(pts) > 1 else None
            for n, (px, py) in zip(ok, pts):
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
                b_lo, b_hi = (np.asarray(b)[n] for b in bars[col]) if bars else (np.nan, np.nan)
                if np.isfinite(b_lo) and np.isfinite(b_hi):  # the 95% interval, nudged sideways so lines do not hide it
                    draw.line([px + 3 * i, Y(b_lo), px + 3 * i, Y(b_hi)], fill=color, width=1)
            if k == 0:
                draw.text((x0 + 10, y1 - 16 - 14 * (len(lines) - 1 - i)), label, fill=color)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    replace_file(out, lambda tmp: canvas.save(tmp, format="PNG"))
    print(f"curve.py: wrote {out}")


def plot(csvs, labels, out):
    """Label fidelity over real (linear), FD ratio (log) and the share of grainy films (worst class; linear) against
    training minutes, one line per run. A csv from before the grainy share draws no line there."""
    runs = [pd.read_csv(c).sort_values("minutes") for c in csvs]
    runs = [r.assign(grainy_pct_worst=r.get("grainy_pct_worst", np.nan)) for r in runs]
    grainy_hi = max(4 * GRAINY_REAL, np.nanmax([r["grainy_pct_worst"].max() for r in runs] + [0]) * 1.05)
    chart([(lab, r["minutes"], r, None) for lab, r in zip(labels, runs)],
          [("label fidelity / real (worst class)", "fidelity_over_real_worst", 0.0, 1.1, False, FIDELITY_TARGET),
           ("realism: FD / real floor (mean over classes, log)", "fd_ratio", 0.7,
            max(50.0, max(r["fd_ratio"].max() for r in runs)), True, REALISM_TARGET),
           ("grainy films % (worst class)", "grainy_pct_worst", 0, grainy_hi, False, (GRAINY_REAL, "real films"))],
          "training minutes", out)

# -----------------------------------------------------------------------------
# --rare: does augmenting a rare class with synthetic films help a classifier on real test films?


def cut_rare(data_dir, out, rare, k, seed, pool):
    """data_dir with the rare class's training films cut to k, drawn at random; val, test and the cache untouched.
    pool "cut": the films cut away stay in train.csv with their label hidden (empty, class_id -1), as the films a
    hospital has without that label: the generator learns them as its null condition, the pseudo-label baseline
    labels them; no classifier sees their labels. -> (films of the rare class kept, films of the largest other class)"""
    df = pd.read_csv(os.path.join(data_dir, "train.csv"))
    rows = df.index[df["label"] == rare]
    if k != "all" and not (k.isdigit() and 1 <= int(k) <= len(rows)):
        raise SystemExit(f"curve.py: error: --k {k}: a number from 1 to {len(rows)} ({rare} training films), or all")
    keep = rows if k == "all" else np.random.default_rng(seed).choice(rows, int(k), replace=False)
    cut = rows.difference(keep)
    df = df.drop(cut) if pool == "none" else df.assign(label=df["label"].mask(df.index.isin(cut)),
                                                       class_id=df["class_id"].mask(df.index.isin(cut), -1))
    os.makedirs(out, exist_ok=True)
    replace_file(os.path.join(out, "train.csv"), lambda tmp: df.to_csv(tmp, index=False))
    for name in ("val.csv", "test.csv", "cache.npy", "prepare.json"):  # the same films, cache rows, class names
        if os.path.exists(os.path.join(data_dir, name)) and not os.path.lexists(os.path.join(out, name)):
            os.symlink(os.path.abspath(os.path.join(data_dir, name)), os.path.join(out, name))
    return len(keep), df[df["label"] != rare]["label"].value_counts().max()


def rare(args):
    if args.rare not in (classes := classes_of(args.data_dir)):
        raise SystemExit(f"curve.py: error: --rare {args.rare}: not a class of {args.data_dir}; choose from "
                         f"{', '.join(classes)}")
    if not os.path.exists(os.path.join(args.data_dir, "train.csv")):
        raise SystemExit(f"curve.py: error: --data-dir {args.data_dir}: no train.csv (run prepare_data.py first)")
    size = args.size or cache_size(args.data_dir) or 32
    run_tag = (f"run-{args.balance}-{args.max_steps}" + (f"-seed{args.train_seed}" if args.train_seed else "")
               + (f"-lr{args.train_lr:g}" if args.train_lr else ""))  # the generator's settings; sample/evaluate below
    rows = []
    for k in args.k:
        base = os.path.join(args.out_dir, f"k{k}" + ("" if args.pool == "none" else f"-pool-{args.pool}"))
        n_real, n_other = cut_rare(args.data_dir, os.path.join(base, "data"), args.rare, k, args.seed, args.pool)
        gen = os.path.join(base, run_tag)
        run("train.py", "--data-dir", os.path.join(base, "data"), "--out-dir", gen, "--resume", "--max-steps",
            args.max_steps, "--batch-size", args.train_batch_size, "--balance", args.balance, "--seed", args.train_seed,
            *(["--lr", args.train_lr] if args.train_lr else []))
        n = args.n_synthetic or max(n_other - n_real, n_real)  # default: as many as the largest other class has
        more = "".join(c for c in args.sample_args if c.isalnum() or c == ".")  # "--eta 1 --steps 50": "eta1steps50"
        samples = os.path.join(gen, f"samples-w{args.guidance:g}-n{n}" + (f"-{more}" if more else ""))
        if not os.path.exists(os.path.join(samples, "manifest.csv")):
            run("sample.py", "--ckpt", gen, "--class", args.rare, "--n", n, "--guidance", args.guidance,
                "--out", samples, "--overwrite", "--batch-size", args.batch_size, *shlex.split(args.sample_args))
        report = evaluated("--data-dir", os.path.join(base, "data"), "--samples", samples, "--size", size,
                           "--out", os.path.join(base, "report"), "--utility-seeds", args.utility_seeds,
                           "--specificity", args.specificity, "--synthetic-share", args.synthetic_share,
                           "--filter", args.filter, "--baselines", "--ceiling", args.data_dir,
                           *shlex.split(args.evaluate_args))
        utility, per_class = report["utility"], report["per_class"][args.rare]
        best = {"best baseline": utility["best"][args.rare]["baseline"],
                "best synthetic": utility["best"][args.rare]["synthetic"]}  # the arms, by point AUC on the test films
        arms = [*utility["baselines"], *utility["synthetic"], "ceiling", "diff", "gain", "gap"]
        rows.append({"k": n_real, "pool": args.pool, "n_setting": args.n_synthetic,
                     "n_synthetic": report["settings"]["n_synthetic_used"],
                     "guidance": args.guidance, "sample_args": args.sample_args,
                     "synthetic_share": args.synthetic_share, "filter": args.filter, "generator": run_tag,
                     "fidelity": per_class["fidelity"], "fd_ratio": per_class["fd_ratio"],
                     "grain": per_class["grain"]["synthetic"]["mean"],
                     "grainy": per_class["grainy"]["synthetic"]["mean"],
                     "memorized": per_class["memorized"] / per_class["n_synthetic"],
                     **best, "n_pseudo": report["settings"].get("n_pseudo", {}).get(args.rare, 0),
                     **{f"{m} {q}{end}": utility[m][args.rare][q + end] for m in arms
                        for q in ("auc", "sens") for end in ("", "_lo", "_hi")},
                     **{f"{name} {q}{end}": utility[best[name]][args.rare][q + end] for name in best
                        for q in ("auc", "sens") for end in ("", "_lo", "_hi")}})
        gap = rows[-1]["gap auc"]  # the share of the ceiling gap the synthetic films close; "no room" under 0.02
        rows[-1]["share closed"] = rows[-1]["gain auc"] / gap if gap >= NO_ROOM else np.nan
    table, path = pd.DataFrame(rows), os.path.join(args.out_dir, "rare.csv")
    keys = ["k", "pool", "generator", "guidance", "sample_args", "n_setting", "synthetic_share", "filter"]  # a row per
    # k and settings
    old = pd.read_csv(path) if os.path.exists(path) else table.iloc[:0]
    old = old.assign(**{key: old[key].astype(object).fillna(v) if key in old else v  # columns added since; ""
                        for key, v in (("pool", "none"), ("sample_args", ""))})  # reads back as nan
    old = old[~old.set_index(keys).index.isin(table.set_index(keys).index)]  # rows of other settings stay
    replace_file(path, lambda tmp: pd.concat([old, table]).to_csv(tmp, index=False))
    show = ["k", "pool", "memorized", "best baseline", "best baseline auc", "best synthetic auc", "ceiling auc",
            "gain auc", "gain auc_lo", "gain auc_hi", "gap auc", "share closed"]
    print(table[show].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    bars = lambda m: {q: (table[f"{m} {q}_lo"], table[f"{m} {q}_hi"]) for q in ("auc", "sens")}
    drawn = (("best cheap baseline", "best baseline"), ("best with synthetic films", "best synthetic"),
             ("ceiling: every real film", "ceiling"))
    lines = [(name, table["k"], {q: table[f"{m} {q}"] for q in ("auc", "sens")}, bars(m)) for name, m in drawn]
    low = np.nanmin(table[[f"{m} {q}_lo" for _, m in drawn for q in ("auc", "sens")]].to_numpy())
    low = min(0.9, max(0.0, np.floor(10 * low) / 10)) if np.isfinite(low) else 0.0
    chart(lines, [(f"{args.rare}: AUC on real test films", "auc", low, 1.0, False, None),
                  (f"{args.rare}: sensitivity at specificity {args.specificity:g}", "sens", low, 1.0, False, None)],
          f"{args.rare} training films k (log scale)", os.path.join(args.out_dir, "rare.png"), log_x=True)
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description="quality against training time, from a run's EMA snapshots",
                                formatter_class=HelpFormatter)
    # ---- score a run ----
    p.add_argument("--run", help="run folder with snapshots/ (train.py --snapshot-every)")
    p.add_argument("--data-dir", help="prepare_data.py output the run was trained on")
    p.add_argument("--size", type=int, default=None, help="image size for evaluate.py (default: the cache's)")
    p.add_argument("--n", type=int, default=200, help="synthetic images per class and snapshot")
    p.add_argument("--sampler", default="ddim-2m", help="sample.py --sampler")
    p.add_argument("--steps", type=int, default=None, help="sample.py --steps (default: the sampler's)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="sample.py --guidance")
    p.add_argument("--batch-size", type=int, default=100, help="sample.py --batch-size")
    p.add_argument("--evaluate-args", default="", help="more evaluate.py flags in one string: \"--reference-share 1\"")
    p.add_argument("--seconds-per-step", type=float, default=None, help="minutes = step x this (a run timed alone), "
                   "instead of the run's own clock (a run that shared the CPU)")
    # ---- plot runs ----
    p.add_argument("--plot", nargs="+", metavar="CSV", help="curve.csv files to draw into one figure")
    p.add_argument("--labels", nargs="+", help="legend entries for --plot (default: the run folder names)")
    p.add_argument("--out", default="curve.png", help="the figure --plot writes")
    # ---- the rare-class benchmark (with --data-dir; --guidance and --batch-size as above) ----
    p.add_argument("--rare", metavar="CLASS", help="the class to cut to k training films and augment")
    p.add_argument("--k", nargs="+", default=["4", "8", "16", "32"], help="training films of the class kept (or all); "
                   "the room is at a few films: from 32 on a classifier is within 0.02 AUC of its ceiling here")
    p.add_argument("--out-dir", default="runs/rare", help="per k: the cut data, the generator, samples, report")
    p.add_argument("--max-steps", type=int, default=4000, help="train.py --max-steps of each generator")
    p.add_argument("--train-batch-size", type=int, default=32, help="train.py --batch-size of each generator")
    p.add_argument("--balance", default="none", help="train.py --balance of each generator")
    p.add_argument("--train-seed", type=int, default=0, help="train.py --seed of each generator (a second generator)")
    p.add_argument("--train-lr", type=float, default=None, help="train.py --lr of each generator (default: per preset)")
    p.add_argument("--sample-args", default="", help="more sample.py flags for the synthetic films in one string: "
                   "\"--eta 1 --steps 50\"")
    p.add_argument("--n-synthetic", type=int, default=0, help="synthetic films added (0: as many as the largest other "
                   "class has, minus k; at least k)")
    p.add_argument("--synthetic-share", type=float, default=0.0, help="evaluate.py --synthetic-share")
    p.add_argument("--filter", default="none", help="evaluate.py --filter")
    p.add_argument("--specificity", type=float, default=0.9, help="evaluate.py --specificity")
    p.add_argument("--utility-seeds", type=int, default=3, help="evaluate.py --utility-seeds")
    p.add_argument("--pool", default="none", choices=["none", "cut"], help="cut: the rare films cut away stay, "
                   "unlabelled: the generator's null condition learns them, the pseudo-label baseline labels them")
    p.add_argument("--seed", type=int, default=0, help="which k films are kept")
    args = p.parse_args(argv)
    if args.plot:
        missing = [c for c in args.plot if not os.path.exists(c)]
        if missing:
            raise SystemExit(f"curve.py: error: --plot {missing[0]}: no such file")
        labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(c))) for c in args.plot]
        if len(labels) != len(args.plot):
            raise SystemExit(f"curve.py: error: --labels: {len(labels)} labels for {len(args.plot)} files")
        return plot(args.plot, labels, args.out)
    if args.rare and args.data_dir:
        return rare(args)
    if not args.run or not args.data_dir:
        raise SystemExit("curve.py: error: give --run and --data-dir to score a run, --rare and --data-dir for the "
                         "rare-class benchmark, or --plot CSV... to draw")
    args.size = args.size or cache_size(args.data_dir) or 32
    score(args)


if __name__ == "__main__":
    main()
