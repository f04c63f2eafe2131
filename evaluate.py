"""
Are these synthetic chest X-rays fit to augment a dataset? One command, no radiologist:

    python evaluate.py --data-dir data/demo --samples samples/ --size 64 --out report/
    python evaluate.py --data-dir data/nih --samples samples/ --size 128 --out report/ --no-utility

1. trains a small reference CNN on the real train split (val for early stopping; cached in --out)
   and reports its per-class accuracy and one-vs-rest AUC on the real test split: the ceiling.
2. label fidelity: share of synthetic images the classifier assigns to the class they were made for.
3. realism: Frechet distance in the classifier's penultimate features, synthetic vs real test, beside
   real val vs real test as the floor (--inception adds Inception FID if torchmetrics is installed).
4. memorization: nearest training image of every synthetic image (feature cosine, pixel correlation),
   flagged when closer than the 1st percentile of real test-to-train distances.
5. utility: AUC on real test of classifiers trained on train, train+synthetic and synthetic only,
   with bootstrap 95% intervals and the difference (train+synth minus train).
Writes report.json, report.md, closest_pairs.png, grid.png, memorization.csv into --out.
"""
import argparse
import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from model import CLASSES

K = len(CLASSES)
PIX = 32  # pixel correlation is computed on images reduced to at most 32x32: copies still match exactly
MIN_PCT = 1.0  # flag synthetic images closer to train than this percentile of real test-to-train distances


def die(msg):
    raise SystemExit(f"evaluate.py: error: {msg}")


# -----------------------------------------------------------------------------
# data: real splits from cache.npy (or PNGs), synthetic images from manifest.csv

def resize(im, size):
    if im.size == (size, size):
        return np.asarray(im, dtype=np.uint8)
    return np.asarray(im.resize((size, size), Image.LANCZOS, reducing_gap=3.0), dtype=np.uint8)  # as prepare_data.py


def read_png(path, size):
    with Image.open(path) as im:
        return resize(im.convert("L"), size)


def read_pngs(paths, size, workers, desc):
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes outside the GIL
        return np.stack(list(tqdm(pool.map(lambda p: read_png(p, size), paths), total=len(paths), desc=desc)))


def class_ids(df, where):
    for col in ("label", "path"):
        if col not in df.columns:
            die(f"{where}: no column '{col}'")
    unknown = sorted(set(df["label"].astype(str)) - set(CLASSES))
    if unknown:
        die(f"{where}: unknown label '{unknown[0]}' (known: {', '.join(CLASSES)})")
    return df["label"].astype(str).map(CLASSES.index).to_numpy(np.int64)


def load_split(data_dir, split, size, workers=0):
    """-> x (N, size, size) uint8, y (N,) int64, image_index (N,) str"""
    csv = Path(data_dir) / f"{split}.csv"
    if not csv.exists():
        die(f"--data-dir {data_dir}: no {split}.csv (run prepare_data.py first)")
    df = pd.read_csv(csv)
    if len(df) == 0:
        die(f"{csv}: empty split")
    y = class_ids(df, str(csv))
    cache = Path(data_dir) / "cache.npy"
    if cache.exists() and "cache_row" in df.columns and (df["cache_row"] >= 0).all():
        cache = np.load(cache, mmap_mode="r")
        if df["cache_row"].max() >= len(cache):
            die(f"{csv}: cache_row {df['cache_row'].max()} is past the end of cache.npy ({len(cache)} rows)")
        x = cache[df["cache_row"].to_numpy()]  # reads only this split's rows
        if x.shape[1] != size:
            x = np.stack([resize(Image.fromarray(im), size) for im in x])
    else:
        x = read_pngs(df["path"].tolist(), size, workers, f"{split} pngs")
    return x, y, df["image_index"].astype(str).to_numpy()


def load_manifest(samples, size, workers=0):
    """-> x (N, size, size) uint8, y (N,) int64, paths (N,) str; relative paths resolve against the manifest"""
    p = Path(samples)
    manifest = p / "manifest.csv" if p.is_dir() or not p.suffix else p
    if not manifest.exists():
        die(f"--samples {samples}: no manifest.csv (run sample.py first)")
    df = pd.read_csv(manifest)
    if len(df) == 0:
        die(f"{manifest}: no synthetic images")
    y = class_ids(df, str(manifest))
    paths = [str(q if q.is_absolute() else manifest.parent / q) for q in map(Path, df["path"].astype(str))]
    for q in paths:
        if not os.path.exists(q):
            die(f"{manifest}: image not found: {q}")
    return read_pngs(paths, size, workers, "synthetic pngs"), y, np.array(paths)


def to_input(x_u8, device):
    x = torch.from_numpy(np.ascontiguousarray(x_u8)).to(device)
    return x.float().div(127.5).sub(1).unsqueeze(1)  # (B, H, W) uint8 -> (B, 1, H, W) in [-1, 1]


# -----------------------------------------------------------------------------
# reference classifier: strided stem -> 3 conv blocks -> global average pool (the features) -> linear

def make_cnn(width):
    def block(c_in, c_out, k=3, s=1):  # ceil_mode: a 16x16 test image still reaches 1x1
        return [nn.Conv2d(c_in, c_out, k, s, k // 2), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
    # ResNet-style stem (stride 2, pool: /4) keeps a CPU run to minutes; CXR findings span far more than 4 pixels
    layers = block(1, width, 5, 2) + block(width, 2 * width) + block(2 * width, 4 * width) + block(4 * width, 4 * width)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, K))  # features: 4 * width


@torch.no_grad()
def predict(net, x, batch_size, device):
    """-> probs (N, K), penultimate features (N, D), both float64 numpy"""
    net.eval()
    probs, feats = [], []
    for i in range(0, len(x), batch_size):
        f = net[:-1](to_input(x[i:i + batch_size], device))
        probs.append(net[-1](f).softmax(1).cpu()), feats.append(f.cpu())
    return torch.cat(probs).double().numpy(), torch.cat(feats).double().numpy()


def fit(x, y, xv, yv, args, tag, out):
    """Class-balanced sampling; keep the epoch with the lowest class-balanced val loss; cached by data+settings hash."""
    config = dict(width=args.width, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
                  lr=args.lr, patience=args.patience, seed=args.seed, size=int(x.shape[-1]))
    torch.manual_seed(args.seed)
    net = make_cnn(args.width)
    h = hashlib.sha256((json.dumps(config, sort_keys=True) + repr(net)).encode())  # a changed CNN retrains too
    for a in (x, y, xv, yv):
        h.update(np.ascontiguousarray(a).tobytes())
    path = out / "classifiers" / f"{tag}-{h.hexdigest()[:16]}.pt"
    if path.exists():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
        print(f"[{tag}] loaded cached classifier {path}")
        return net.to(args.device).eval(), True
    g = torch.Generator().manual_seed(args.seed)
    net.to(args.device)
    counts = np.bincount(y, minlength=K)
    w = torch.from_numpy(1.0 / counts[y])  # every class equally likely per draw: NIH is ~60% No Finding
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.steps or math.ceil(len(x) / args.batch_size)
    best, best_state, bad = np.inf, None, 0
    for epoch in range(args.epochs):
        net.train()
        for _ in tqdm(range(steps), desc=f"[{tag}] epoch {epoch + 1}/{args.epochs}", leave=False):
            idx = torch.multinomial(w, args.batch_size, replacement=True, generator=g).numpy()
            loss = F.cross_entropy(net(to_input(x[idx], args.device)), torch.from_numpy(y[idx]).to(args.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        pv, _ = predict(net, xv, args.batch_size, args.device)
        nll = -np.log(np.clip(pv[np.arange(len(yv)), yv], 1e-12, None))
        val_loss = np.mean([nll[yv == c].mean() for c in np.unique(yv)])  # class-balanced: each class counts the same
        print(f"[{tag}] epoch {epoch + 1}: train loss {loss.item():.3f}, val balanced loss {val_loss:.3f}, "
              f"val macro AUC {np.nanmean(per_class_auc(pv, yv)):.3f}")
        if val_loss < best:
            best, best_state, bad = val_loss, {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= args.patience:
                break
    net.load_state_dict(best_state)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": best_state, "config": config}, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    return net.eval(), False


# -----------------------------------------------------------------------------
# metrics, written out so they can be read and checked

def auc(score, pos):
    """One-vs-rest ROC AUC = Mann-Whitney U / (n_pos n_neg), ties get average ranks; nan if one side is empty."""
    pos = np.asarray(pos, bool)
    n1, n0 = pos.sum(), (~pos).sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    _, inv, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inv]  # 1-based average rank of each score
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def per_class_auc(probs, y):
    return np.array([auc(probs[:, c], y == c) for c in range(K)])


def sqrtm_psd(a):
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # V sqrt(L) V^T


def frechet_stats(mu1, s1, mu2, s2):
    """|mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(sqrt(S1) S2 sqrt(S1)); the last product is symmetric PSD."""
    r1 = sqrtm_psd(s1)
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return max(0.0, float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_cross))  # >= 0 up to rounding


def frechet_distance(f1, f2):
    if len(f1) < 2 or len(f2) < 2:
        return float("nan")
    return frechet_stats(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


def unit_rows(f, mu=None):
    f = torch.as_tensor(f, dtype=torch.float32)
    f = f - (f.mean(1, keepdim=True) if mu is None else torch.as_tensor(mu, dtype=torch.float32))
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-8)


def pixels(x):
    t = torch.from_numpy(np.ascontiguousarray(x)).float().unsqueeze(1)  # (N, 1, H, W)
    if t.shape[-1] > PIX:
        t = F.interpolate(t, size=(PIX, PIX), mode="bilinear", antialias=True, align_corners=False)
    return unit_rows(t.flatten(1))  # cosine of per-image centred pixels = Pearson r


def nearest(q, ref, device, chunk=512):
    """-> (similarity, index) of each query row's nearest reference row; rows are unit vectors"""
    ref = ref.to(device)
    sims, idxs = [], []
    for i in tqdm(range(0, len(q), chunk), desc="nearest train", leave=False):
        s, j = (q[i:i + chunk].to(device) @ ref.T).max(1)
        sims.append(s.cpu()), idxs.append(j.cpu())
    return torch.cat(sims).double().numpy(), torch.cat(idxs).numpy()


def bootstrap_auc(models, y, n_boot, seed):
    """Paired bootstrap over test images: per model and class (auc, lo, hi), plus diff of models[1] - models[0]."""
    names = list(models)
    point = {m: per_class_auc(p, y) for m, p in models.items()}
    rng, reps = np.random.default_rng(seed), {m: [] for m in names}
    for _ in tqdm(range(n_boot), desc="bootstrap", leave=False):
        i = rng.integers(0, len(y), len(y))
        for m in names:
            reps[m].append(per_class_auc(models[m][i], y[i]))
    reps = {m: np.array(r) for m, r in reps.items()}  # (n_boot, K)
    point["diff"], reps["diff"] = point[names[1]] - point[names[0]], reps[names[1]] - reps[names[0]]
    res = {}
    for m in point:
        macro = np.nanmean(reps[m], 1)
        lo, hi = np.nanpercentile(np.column_stack([reps[m], macro]), [2.5, 97.5], axis=0)
        est = np.append(point[m], np.nanmean(point[m]))
        res[m] = {name: {"auc": est[c], "lo": lo[c], "hi": hi[c]} for c, name in enumerate(CLASSES + ["macro"])}
    return res


# -----------------------------------------------------------------------------
# outputs: written to a temporary name, then renamed

def replace_file(path, write):
    if path.exists():
        print(f"evaluate.py: replacing {path}")
    write(f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def save_rows_png(rows, path, tile):
    """rows: lists of (uint8 image, caption); each image is blown up to tile x tile with its caption above."""
    cap = 14
    canvas = Image.new("L", (tile * max(len(r) for r in rows), len(rows) * (tile + cap)), 0)
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        for j, (im, text) in enumerate(row):
            draw.text((j * tile + 2, i * (tile + cap) + 1), text, fill=255)
            canvas.paste(Image.fromarray(im).resize((tile, tile), Image.NEAREST), (j * tile, i * (tile + cap) + cap))
    info = PngInfo()  # the figure holds synthetic images: say so in the file, not only in the captions
    info.add_text("synthetic", "1")
    info.add_text("Description", "contains SYNTHETIC chest X-rays generated by a diffusion model (captioned)")
    replace_file(path, lambda tmp: canvas.save(tmp, format="PNG", pnginfo=info))


def clean(v):
    if isinstance(v, dict):
        return {k: clean(u) for k, u in v.items()}
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else round(float(v), 4)
    return int(v) if isinstance(v, np.integer) else v


def table(header, rows):
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]) + "\n"


def make_fid(device):
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        die("--inception needs torchmetrics with its image extras (pip install 'torchmetrics[image]')")
    try:
        return FrechetInceptionDistance(feature=2048).to(device)
    except Exception as e:  # the Inception weights are fetched on first use; offline that fails
        first_line = (str(e).splitlines() or [""])[0]
        die(f"--inception: could not load the Inception weights: {type(e).__name__}: {first_line}")


def inception_fid(fid, xs, xte, device):
    for x, real in ((xte, True), (xs, False)):
        for i in range(0, len(x), 64):
            rgb = torch.from_numpy(np.ascontiguousarray(x[i:i + 64])).to(device).unsqueeze(1).repeat(1, 3, 1, 1)
            fid.update(rgb, real=real)  # uint8 (B, 3, H, W): grayscale repeated; torchmetrics resizes to 299
    return float(fid.compute())


# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Realism, label fidelity, memorization and utility of synthetic CXRs.")
    # ---- data ----
    p.add_argument("--data-dir", required=True, help="prepare_data.py output (train/val/test.csv, cache.npy)")
    p.add_argument("--samples", required=True, help="sample.py output folder with manifest.csv (or the csv)")
    p.add_argument("--size", type=int, default=128, help="resolution; real and synthetic are resized to it")
    p.add_argument("--out", default="report", help="output folder; also caches the trained classifiers")
    p.add_argument("--workers", type=int, default=4, help="threads decoding PNGs")
    # ---- classifier ----
    p.add_argument("--width", type=int, default=16, help="channels of the first conv block of the reference CNN")
    p.add_argument("--epochs", type=int, default=8, help="max epochs per classifier (early stopping on val loss)")
    p.add_argument("--steps", type=int, default=40, help="steps per epoch (0 = one pass over its training set)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size for training and inference")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    p.add_argument("--patience", type=int, default=3, help="stop after this many epochs without val improvement")
    # ---- evaluation ----
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the test set for the AUC intervals")
    p.add_argument("--no-utility", action="store_true", help="skip training on train+synthetic and synthetic only")
    p.add_argument("--inception", action="store_true", help="also Inception FID (needs torchmetrics + weights)")
    p.add_argument("--pairs", type=int, default=8, help="closest synthetic/train pairs drawn in closest_pairs.png")
    # ---- system ----
    p.add_argument("--seed", type=int, default=0, help="seed for training, sampling and the bootstrap")
    p.add_argument("--device", default="auto", help="auto (cuda, else cpu), cuda or cpu")
    args = p.parse_args(argv)
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {args.device}: no CUDA device here (use --device cpu)")
    if not Path(args.data_dir).is_dir():
        die(f"--data-dir {args.data_dir}: no such directory (run prepare_data.py first)")
    fid = make_fid(args.device) if args.inception else None  # fail before any training
    out, B, dev = Path(args.out), args.batch_size, args.device
    out.mkdir(parents=True, exist_ok=True)

    # ---- data
    (xtr, ytr, itr), (xva, yva, _), (xte, yte, _) = [load_split(args.data_dir, s, args.size, args.workers)
                                                     for s in ("train", "val", "test")]
    xs, ys, ps = load_manifest(args.samples, args.size, args.workers)
    print(f"real train/val/test {len(xtr)}/{len(xva)}/{len(xte)}, synthetic {len(xs)}, size {args.size}, device {dev}")
    R = {"settings": {**vars(args), "n_train": len(xtr), "n_val": len(xva), "n_test": len(xte), "n_synthetic": len(xs)}}

    # ---- 1. reference classifier, trained on real train only: the ceiling for everything below
    net, cached = fit(xtr, ytr, xva, yva, args, "real", out)
    (_, f_tr), (_, f_va), (p_te, f_te), (p_s, f_s) = [predict(net, x, B, dev) for x in (xtr, xva, xte, xs)]
    auc_te = per_class_auc(p_te, yte)
    # ---- 2. label fidelity: does a synthetic "Effusion" look like Effusion to the classifier?
    hit_te, hit_s = p_te.argmax(1) == yte, p_s.argmax(1) == ys
    # ---- 3. realism: Frechet distance in the classifier's penultimate features; real val vs real test is the floor
    realism = {"synthetic_vs_test": frechet_distance(f_s, f_te), "val_vs_test": frechet_distance(f_va, f_te)}
    inception = inception_fid(fid, xs, xte, dev) if fid is not None else None
    # ---- 4. memorization: nearest training image of each synthetic image, and of each test image for the threshold
    mu = f_tr.mean(0)  # ReLU features are all positive: centre them or every cosine is near 1
    uf_tr, px_tr = unit_rows(f_tr, mu), pixels(xtr)
    cos_s, jf_s = nearest(unit_rows(f_s, mu), uf_tr, dev)
    r_s, jp_s = nearest(pixels(xs), px_tr, dev)
    cos_te, r_te = nearest(unit_rows(f_te, mu), uf_tr, dev)[0], nearest(pixels(xte), px_tr, dev)[0]
    # no patient is in two splits, so real test-to-train distances are what "not copied" looks like
    thr_cos, thr_r = 1 - np.percentile(1 - cos_te, MIN_PCT), 1 - np.percentile(1 - r_te, MIN_PCT)
    flag = (cos_s > thr_cos) | (r_s > thr_r)

    # ---- the same figures per class
    R["classifier"] = {"cached": cached, "macro_auc": np.nanmean(auc_te), "per_class": {}}
    R["label_fidelity"] = {"overall": {"synthetic": hit_s.mean(), "real_test": hit_te.mean()}, "per_class": {}}
    R["realism"] = {"overall": realism, "per_class": {}, "inception_fid": inception}
    R["memorization"] = {"threshold_feature_cosine": thr_cos, "threshold_pixel_corr": thr_r, "flagged": flag.sum(),
                         "per_class": {}}
    safe = lambda f, a: f(a) if len(a) else np.nan  # a class can be absent from the manifest
    for c, n in enumerate(CLASSES):
        s, t, v = ys == c, yte == c, yva == c  # synthetic, test, val images of class c
        R["classifier"]["per_class"][n] = {"n_test": t.sum(), "accuracy": safe(np.mean, hit_te[t]), "auc": auc_te[c]}
        R["label_fidelity"]["per_class"][n] = {"n_synthetic": s.sum(), "synthetic": safe(np.mean, hit_s[s]),
                                               "real_test": safe(np.mean, hit_te[t])}
        R["realism"]["per_class"][n] = {"synthetic_vs_test": frechet_distance(f_s[s], f_te[t]),
                                        "val_vs_test": frechet_distance(f_va[v], f_te[t])}
        R["memorization"]["per_class"][n] = {"n_synthetic": s.sum(), "flagged": flag[s].sum(),
                                             "median_feature_cosine": safe(np.median, cos_s[s]),
                                             "median_pixel_corr": safe(np.median, r_s[s])}
    mem = pd.DataFrame({"path": ps, "label": [CLASSES[c] for c in ys], "nearest_train_feature": itr[jf_s],
                        "feature_cosine": cos_s.round(5), "nearest_train_pixel": itr[jp_s], "pixel_corr": r_s.round(5),
                        "flagged": flag.astype(int)})
    replace_file(out / "memorization.csv", lambda tmp: mem.to_csv(tmp, index=False))
    order = np.lexsort((-r_s, ~flag))[:max(1, args.pairs)]  # flagged first, then the most correlated
    pairs = [[(xs[i], f"synthetic {CLASSES[ys[i]]}" + (" FLAGGED" if flag[i] else "")),
              (xtr[jp_s[i]], f"train {itr[jp_s[i]]} r={r_s[i]:.3f}")] for i in order]
    save_rows_png(pairs, out / "closest_pairs.png", 200)
    save_rows_png([[(im, f"real {n}") for im in xte[yte == c][:4]] + [(im, f"synthetic {n}") for im in xs[ys == c][:4]]
                   for c, n in enumerate(CLASSES)], out / "grid.png", 128)

    # ---- 5. utility: does adding the synthetic images help a classifier on real test images?
    R["utility"] = None
    if not args.no_utility:
        net_ts, _ = fit(np.concatenate([xtr, xs]), np.concatenate([ytr, ys]), xva, yva, args, "train+synth", out)
        net_s, _ = fit(xs, ys, xva, yva, args, "synth", out)
        probs = {"train": p_te, "train+synth": predict(net_ts, xte, B, dev)[0], "synth": predict(net_s, xte, B, dev)[0]}
        R["utility"] = {"n_boot": args.n_boot, **bootstrap_auc(probs, yte, args.n_boot, args.seed)}

    # ---- 6. report
    R = clean(R)
    replace_file(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(R, indent=2)))
    M = R["memorization"]
    rows = lambda sec, extra=(): [[n, *R[sec]["per_class"][n].values()] for n in CLASSES] + list(extra)
    md = [f"# Synthetic CXR evaluation\n\n{len(xs)} synthetic images ({args.samples}) vs real {args.data_dir} "
          f"(train/val/test {len(xtr)}/{len(xva)}/{len(xte)}), size {args.size}, seed {args.seed}.\n",
          f"## 1. Reference classifier (real train -> real test): the ceiling\n\n"
          f"macro AUC {R['classifier']['macro_auc']}\n",
          table(["class", "n test", "accuracy", "AUC"], rows("classifier")),
          "## 2. Label fidelity: share the classifier assigns to the intended class\n",
          table(["class", "n synthetic", "synthetic", "real test"],
                rows("label_fidelity", [["overall", len(xs), *R["label_fidelity"]["overall"].values()]])),
          "## 3. Realism: Frechet distance in classifier features (lower is better; val vs test is the floor)\n",
          table(["class", "synthetic vs test", "val vs test"],
                rows("realism", [["overall", *R["realism"]["overall"].values()]]))
          + f"\nInception FID: {'not computed (--inception)' if inception is None else round(inception, 3)}\n",
          f"## 4. Memorization: {M['flagged']} of {len(xs)} flagged\n\nFlagged = nearest training image with feature "
          f"cosine > {M['threshold_feature_cosine']} or pixel correlation > {M['threshold_pixel_corr']}, closer than "
          f"all but {MIN_PCT:g}% of real test images. See closest_pairs.png and memorization.csv.\n",
          table(["class", "n synthetic", "flagged", "median cosine", "median pixel r"], rows("memorization"))]
    if R["utility"]:
        ci = lambda d: "-" if None in (d["auc"], d["lo"]) else f"{d['auc']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"
        md += [f"## 5. Utility: AUC on real test, 95% bootstrap CI ({args.n_boot} resamples)\n",
               table(["class", "train", "train+synth", "synth only", "train+synth - train"],
                     [[n] + [ci(R["utility"][m][n]) for m in ("train", "train+synth", "synth", "diff")]
                      for n in CLASSES + ["macro"]])]
    replace_file(out / "report.md", lambda tmp: Path(tmp).write_text("\n".join(md)))
    print("\n".join(md))
    return R


if __name__ == "__main__":
    main()
