"""
evaluate.py - are these synthetic chest X-rays fit to augment a dataset? One command, no radiologist, no downloads:

    python instruments/evaluate.py --data-dir data/nih --samples samples/ --size 128 --out report/ [--no-utility]

Per class, in the features of a small CNN trained on real train: label fidelity, size-matched realism (FD ratio,
KID), diversity, noise-like and memorized images; and utility: AUC on real test of classifiers trained with and
without them (--baselines: beside what can be done without a generator; --ceiling: and every real film). A
multi-label --data-dir (prepare_data.py --labels multi) is read per finding, with a sigmoid per finding, and per label
set of the synthetic films. Writes report.md (the headline table first), report.json, closest_pairs.png, grid.png,
memorization.csv.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, PngImagePlugin
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # model.py, in the root
from model import HelpFormatter, bar_pace, classes_of, labels_of, replace_file, set_threads

PIX = 32  # pixel correlation is computed on images reduced to at most 32x32: copies still match exactly
MIN_PCT = 1.0  # flag synthetic images closer to train than this percentile of real test-to-train distances
CHUNK = 4096  # images per chunk when resizing or reducing a whole split: memory stays flat at NIH scale
GRAIN_X = 1.5  # noise-like: more grain than GRAIN_X times the grainiest real film of the pool
GRAINY_Q = 95  # grainy: more grain than this percentile of real films (5% of real films are; the mean hides a tail)
PSEUDO_CONF = 0.9  # pseudo-labels: an unlabelled film joins with the class the real classifier gives it this sure
AUG_DEG, AUG_SCALE, AUG_SHIFT, AUG_LEVEL = 5.0, 0.1, 0.05, 0.1  # safe augmentation: degrees, +-scale, +-shift (of the
# film), +-brightness and contrast (of the [-1, 1] range); never a flip: laterality is anatomy


def die(msg):
    raise SystemExit(f"evaluate.py: error: {msg}")


# -----------------------------------------------------------------------------
# data: real splits from cache.npy (or PNGs), synthetic images from manifest.csv

def load(csv, size, workers, missing, empty, classes, unlabelled=False, multi=False):
    """train/val/test.csv or manifest.csv -> x (N, size, size) uint8, y (N,) int64 (the label's index in classes; -1
    for a film whose label is empty, where unlabelled; multi: (N, F) 0/1, the finding columns), the table. The images
    come from cache.npy beside the csv where every row has a cache_row, else from the PNGs (relative paths: from the
    csv)."""
    if not csv.exists():
        die(missing)
    df = pd.read_csv(csv)
    if len(df) == 0:
        die(f"{csv}: {empty}")
    for col in sorted({"label", "path"} - set(df.columns)):
        die(f"{csv}: no column '{col}'")
    if multi:  # a 0/1 column per finding, as train.csv and a multi-label sample.py manifest have
        if lost := [c for c in classes if c not in df.columns]:
            die(f"{csv}: no column '{lost[0]}': --data-dir is multi-label (prepare_data.py --labels multi), these "
                f"films are not (sample.py --findings or --match-train on a multi-label checkpoint writes them)")
        y = df[classes].to_numpy(np.int64)
    else:
        known = df["label"].notna() | (not unlabelled)  # an empty label: an unlabelled film (split files only)
        if unknown := sorted(set(df["label"][known].astype(str)) - set(classes)):
            die(f"{csv}: unknown label '{unknown[0]}' (the classes of --data-dir: {', '.join(classes)})")
        y = df["label"].astype(str).map({c: i for i, c in enumerate(classes)}).where(df["label"].notna(), -1)
        y = y.to_numpy(np.int64)
    resize = lambda im: np.asarray(im.resize((size, size), Image.LANCZOS, reducing_gap=3.0))  # as prepare_data.py
    cache = csv.parent / "cache.npy"
    if cache.exists() and "cache_row" in df.columns and (df["cache_row"] >= 0).all():
        try:  # a copy cut short (an interrupted copy) fails np.load's header or size checks
            cache, rows = np.load(cache, mmap_mode="r"), df["cache_row"].to_numpy()
        except (ValueError, EOFError):
            die(f"{cache} is damaged (cut short?): prepare the data again with prepare_data.py")
        if rows.max() >= len(cache):
            die(f"{csv}: cache_row {rows.max()} is past the end of cache.npy ({len(cache)} rows)")
        x = np.empty((len(rows), size, size), np.uint8)
        for i in range(0, len(rows), CHUNK):  # reads only these rows, a chunk at a time
            chunk = cache[rows[i:i + CHUNK]]
            x[i:i + CHUNK] = chunk if chunk.shape[1] == size else [resize(Image.fromarray(im)) for im in chunk]
        return x, y, df
    df["path"] = [str(p if p.is_absolute() else csv.parent / p) for p in map(Path, df["path"].astype(str))]
    if lost := [p for p in df["path"] if not os.path.exists(p)]:
        die(f"{csv}: image not found: {lost[0]}")
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes outside the GIL; a PNG's file closes on load
        x = pool.map(lambda p: resize(Image.open(p).convert("L")), df["path"])
        return np.stack(list(tqdm(x, total=len(df), desc=f"{csv.name} pngs", **bar_pace()))), y, df


def load_split(data_dir, split, size, workers=0, unlabelled=False):
    """-> x (N, size, size) uint8, y (N,) int64 (multi-label: (N, F)), the split's table: its labelled films;
    unlabelled: then x (N', size, size) and the table of the films whose label is empty too (kept by prepare_data.py
    for the generator)"""
    multi = labels_of(data_dir) == "multi"
    x, y, df = load(Path(data_dir) / f"{split}.csv", size, workers, f"--data-dir {data_dir}: no {split}.csv (run "
                    "prepare_data.py first)", "empty split", classes_of(data_dir), unlabelled=True, multi=multi)
    if multi:  # every film carries its label set
        return (x, y, df, x[:0], df[:0]) if unlabelled else (x, y, df)
    if (y >= 0).sum() == 0:
        die(f"--data-dir {data_dir}: {split}.csv has no labelled film")
    labelled = x[y >= 0], y[y >= 0], df[y >= 0].reset_index(drop=True)
    return (*labelled, x[y < 0], df[y < 0].reset_index(drop=True)) if unlabelled else labelled


def patients(df):  # (N,) str: the patient of each film; without patient ids, every film is its own patient
    return (df["patient_id"] if "patient_id" in df.columns else df["image_index"]).astype(str).to_numpy()


def reference_films(patient, y, share, seed):
    """(N,) bool: the training films the reference classifier learns from, those of a `share` of the patients,
    stratified by each patient's first class: of each class's patients, in a random order, every 1/share-th."""
    pids, first, codes = np.unique(patient, return_index=True, return_inverse=True)
    cls = y[first]
    order = np.lexsort((np.random.default_rng(seed).random(len(pids)), cls))  # by class, shuffled within a class
    r = np.arange(len(pids)) - np.searchsorted(cls[order], cls[order])  # rank within its class
    take = np.zeros(len(pids), bool)
    take[order] = np.ceil((r + 1) * share) > np.ceil(r * share)  # share 0.5: ranks 0, 2, 4, ...; 1: all
    return take[codes]


def to_input(x_u8, device):  # (B, H, W) uint8 -> (B, 1, H, W) in [-1, 1]
    return torch.from_numpy(np.ascontiguousarray(x_u8)).to(device).float().div(127.5).sub(1).unsqueeze(1)


# -----------------------------------------------------------------------------
# reference classifier: strided stem -> 3 conv blocks -> global average pool (the features) -> linear

def make_cnn(width, K):
    def block(c_in, c_out, k=3, s=1):  # ceil_mode: a 16x16 test image still reaches 1x1
        return [nn.Conv2d(c_in, c_out, k, s, k // 2), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
    # ResNet-style stem (stride 2, pool: /4) keeps a CPU run to minutes; CXR findings span far more than 4 pixels
    layers = block(1, width, 5, 2) + block(width, 2 * width) + block(2 * width, 4 * width) + block(4 * width, 4 * width)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, K))  # features: 4 * width


@torch.no_grad()
def predict(net, x, batch_size, device, multi=False):
    """-> probs (N, K) (softmax; multi: a sigmoid per finding), penultimate features (N, D), both float64 numpy"""
    net.eval()
    f = torch.cat([net[:-1](to_input(x[i:i + batch_size], device))  # (N, D); no films: (0, D)
                   for i in range(0, max(len(x), 1), batch_size)])
    logits = net[-1](f)
    return (logits.sigmoid() if multi else logits.softmax(1)).cpu().double().numpy(), f.cpu().double().numpy()


def augment(x, g):
    """(B, 1, H, W) -> the same films, each turned, scaled and shifted a little, brighter or darker: what a film of
    the same patient taken again may look like. Never flipped: the heart is on the left."""
    u = lambda r: (2 * torch.rand(len(x), generator=g) - 1) * r  # (B,) uniform in [-r, r]
    a, s = torch.deg2rad(u(AUG_DEG)), 1 + u(AUG_SCALE)
    theta = torch.stack([torch.stack([a.cos() / s, -a.sin() / s, u(AUG_SHIFT)], 1),
                         torch.stack([a.sin() / s, a.cos() / s, u(AUG_SHIFT)], 1)], 1).to(x.device)  # (B, 2, 3)
    x = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), padding_mode="border",
                      align_corners=False)
    level = lambda: (1 + u(AUG_LEVEL)).view(-1, 1, 1, 1).to(x.device)
    return (x * level() + level() - 1).clamp(-1, 1)  # contrast, then brightness


def draw_weights(y, n_real, share, K):
    """(N,) chance of each image per draw: every class the same total (NIH is ~84% No Finding). Rows from n_real on
    are synthetic: with share > 0 they take that share of their class's draws, whatever their number."""
    synthetic = np.arange(len(y)) >= n_real
    counts, real, synth = (np.bincount(y[m], minlength=K) for m in (np.ones_like(synthetic), ~synthetic, synthetic))
    w = 1.0 / counts[y]
    if share > 0:
        part = np.where(synthetic, share / np.maximum(synth, 1)[y], (1 - share) / np.maximum(real, 1)[y])
        w = np.where(((real > 0) & (synth > 0))[y], part, w)  # in classes with both real and synthetic images
    return w / w.sum()


def fit(x, y, xv, yv, args, tag, out, seed, digests, n_real=None, aug=False, weighted=False, init=None):
    """Draws by draw_weights (weighted: draws by frequency, the loss weighs classes alike instead; aug: augment();
    init: a trained net to start from, to fine-tune it); keeps the epoch of lowest class-balanced val loss; cached by
    a data+settings hash."""
    n_real, share = len(x) if n_real is None else n_real, args.synthetic_share if n_real is not None else 0
    multi = y.ndim > 1  # label sets: a sigmoid and a binary cross-entropy per finding, every film drawn alike
    config = dict(width=args.width, epochs=args.epochs, steps=args.epoch_steps, batch_size=args.batch_size,
                  lr=args.lr, patience=args.patience, seed=seed, size=int(x.shape[-1]), n_real=n_real, share=share,
                  **({"aug": AUG_DEG, "aug_scale": AUG_SCALE, "aug_shift": AUG_SHIFT, "aug_level": AUG_LEVEL} if aug
                     else {}), **({"weighted": True} if weighted else {}),
                  **({"multi": True} if multi else {}))  # old settings, old hashes: caches hold
    torch.manual_seed(seed)
    net = make_cnn(args.width, args.n_classes).to(args.device)
    h = hashlib.sha256((json.dumps(config, sort_keys=True) + repr(net)).encode())  # a changed CNN retrains too
    if init is not None:
        net.load_state_dict(init.state_dict())
        h.update(b"".join(v.cpu().numpy().tobytes() for v in init.state_dict().values()))
    for a in (x, y, xv, yv):  # each array hashed once per run, not per classifier; kept beside its digest: no id reuse
        if id(a) not in digests:  # no copy: x is ~1 GB at NIH scale
            digests[id(a)] = a, hashlib.sha256(memoryview(np.ascontiguousarray(a)).cast("B")).digest()
        h.update(digests[id(a)][1])
    path = out / "classifiers" / f"{tag}-{h.hexdigest()[:16]}.pt"
    if path.exists():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
        return net.eval(), True
    g = torch.Generator().manual_seed(seed)
    w = torch.from_numpy(np.full(len(y), 1 / len(y)) if weighted or multi else
                         draw_weights(y, n_real, share, args.n_classes))
    counts = np.bincount(y, minlength=args.n_classes) if weighted else None
    class_w = torch.tensor(len(y) / (np.maximum(counts, 1) * (counts > 0).sum()), dtype=torch.float32) if weighted \
        else None  # (K,): n / (K n_c), each class's films weigh as much as any other class's in the loss
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epoch_steps or math.ceil(len(x) / args.batch_size)
    best, best_state, best_epoch = np.inf, None, 0
    for epoch in range(args.epochs):
        net.train()
        for _ in tqdm(range(steps), desc=f"[{tag} seed {seed}] epoch {epoch + 1}/{args.epochs}", leave=False,
                      **bar_pace()):
            idx = torch.multinomial(w, args.batch_size, replacement=True, generator=g).numpy()
            xb = to_input(x[idx], args.device)  # (B, 1, H, W)
            xb = augment(xb, g) if aug else xb
            yb = torch.from_numpy(y[idx]).to(args.device)
            loss = (F.binary_cross_entropy_with_logits(net(xb), yb.float()) if multi else
                    F.cross_entropy(net(xb), yb, weight=None if class_w is None else class_w.to(args.device)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        pv = predict(net, xv, args.batch_size, args.device, multi)[0]
        if multi:  # per finding held by val films: its mean binary cross-entropy; findings count the same
            nll = -np.log(np.clip(np.where(yv == 1, pv, 1 - pv), 1e-12, None))  # (N, F)
            val_loss = np.mean([nll[:, c].mean() for c in np.flatnonzero(yv.any(0))])
        else:
            nll = -np.log(np.clip(pv[np.arange(len(yv)), yv], 1e-12, None))
            val_loss = np.mean([nll[yv == c].mean() for c in np.unique(yv)])  # class-balanced: classes count the same
        if val_loss < best:
            best, best_state, best_epoch = val_loss, {k: v.cpu().clone() for k, v in net.state_dict().items()}, epoch
        elif epoch - best_epoch >= args.patience:
            break
    net.load_state_dict(best_state)
    replace_file(path, lambda tmp: torch.save({"state_dict": best_state, "config": config}, tmp))
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


def of_class(y, c):  # (N,) bool: the films of class c (y (N,) class ids), or showing finding c (y (N, F) label sets)
    return y == c if y.ndim == 1 else y[:, c] == 1


def sensitivity_at(score, pos, specificity):
    """Cases found at a fixed false-alarm rate: share of positives above the `specificity` quantile of the negatives"""
    pos = np.asarray(pos, bool)
    if pos.all() or not pos.any():
        return float("nan")
    return float((score[pos] > np.quantile(score[~pos], specificity, method="inverted_cdf")).mean())


def class_scores(probs, y, specificity):
    """(2, K + 1): every class's one-vs-rest AUC (y (N, K) label sets: every finding's), then its sensitivity at
    `specificity`; last column: the macro mean"""
    K = probs.shape[1]
    s = np.array([[auc(probs[:, c], of_class(y, c)) for c in range(K)],
                  [sensitivity_at(probs[:, c], of_class(y, c), specificity) for c in range(K)]])
    mean = [[np.nanmean(row) if np.isfinite(row).any() else np.nan] for row in s]  # no warning where all are nan
    return np.concatenate([s, mean], 1)


def sqrtm_psd(a):
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # V sqrt(L) V^T


def frechet_stats(mu1, s1, mu2, s2):
    """|mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(sqrt(S1) S2 sqrt(S1)); the last product is symmetric PSD."""
    r1 = sqrtm_psd(s1)
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return max(0.0, float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_cross))  # >= 0 up to rounding


def frechet_distance(f1, f2):
    """Biased upward roughly as 1/n: compare two distances only at the same set sizes."""
    if len(f1) < 2 or len(f2) < 2:
        return float("nan")
    return frechet_stats(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


def kid(f1, f2):
    """Kernel Inception Distance (Binkowski et al. 2018) in our features: the unbiased estimate of MMD^2 with the
    kernel k(a, b) = (a.b / d + 1)^3. Its mean is the same at any set size; 0 for two samples of one distribution."""
    d, m, n = f1.shape[1], len(f1), len(f2)
    k11, k22, k12 = [(a @ b.T / d + 1) ** 3 for a, b in ((f1, f1), (f2, f2), (f1, f2))]
    return float((k11.sum() - np.trace(k11)) / (m * (m - 1)) + (k22.sum() - np.trace(k22)) / (n * (n - 1))
                 - 2 * k12.mean())


def matched_realism(f_s, f_real, t_s, t_real, groups, repeats, max_n, rng):
    """Like with like, per redraw: two disjoint halves A, B of the real pool (films the reference classifier did not
    learn from; a patient's films stay on one side: groups (N_real,) are patient codes) and synthetic S, n films each,
    n = min(synthetic, real / 2, max_n): S vs B is what the generator scores, A vs B what a perfect one would (the
    floor). t: (N, 2) texture() of each film; its means take every synthetic film, resampled with replacement, so
    that the interval holds their sampling too. -> (repeats, 10): FD(S, B), FD(A, B), KID(S, B), KID(A, B), then for
    grain and gradient in turn: mean(synthetic) / mean(B), mean(A) / mean(B); then the share of synthetic films and
    of A grainier than GRAINY_Q% of B (a few grainy films among smooth ones leave the mean at 1, not this)"""
    n = min(len(f_s), len(f_real) // 2, max_n)
    if n < 2:
        return np.full((repeats, 10), np.nan)
    draws = []
    for _ in range(repeats):
        order = np.lexsort((rng.random(len(groups)), rng.permutation(groups.max() + 1)[groups]))  # patients shuffled
        a, b, s = order[:n], order[n:2 * n], rng.choice(len(f_s), n, replace=False)
        boot = t_s[rng.integers(0, len(t_s), len(t_s))]  # (N_s, 2)
        ratios = [[boot[:, j].mean() / t_real[b, j].mean(), t_real[a, j].mean() / t_real[b, j].mean()] for j in (0, 1)]
        grainy = np.percentile(t_real[b, 0], GRAINY_Q)
        draws.append([frechet_distance(f_s[s], f_real[b]), frechet_distance(f_real[a], f_real[b]),
                      kid(f_s[s], f_real[b]), kid(f_real[a], f_real[b]), *ratios[0], *ratios[1],
                      (boot[:, 0] > grainy).mean(), (t_real[a, 0] > grainy).mean()])
    return np.array(draws)


def realism(d):
    """d: (repeats, 10) from matched_realism -> the FD ratio; FD, KID, grain and gradient ratios and the grainy share,
    synthetic and floor: mean [95% of redraws]. The floor's interval is the range real films take against real
    films at this n."""
    ci = lambda v: dict(zip(("mean", "lo", "hi"), (v.mean(), *np.percentile(v, [2.5, 97.5]))))  # nan stays nan
    pair = lambda j: {"synthetic": ci(d[:, j]), "floor": ci(d[:, j + 1])}
    return {"fd_ratio": d[:, 0].mean() / d[:, 1].mean(), "fd": pair(0), "kid": pair(2), "grain": pair(4),
            "gradient": pair(6), "grainy": pair(8)}


def diversity(f, max_n, rng):
    """Mean distance between two different rows (a U-statistic: the same mean at any set size); 0 if all alike."""
    f = torch.as_tensor(f[rng.permutation(len(f))[:max_n]], dtype=torch.float64)
    return float(torch.cdist(f, f).sum() / (len(f) * (len(f) - 1))) if len(f) > 1 else float("nan")


def texture(x):
    """(N, H, W) uint8 -> (N, 2): each film's grain and mean |gradient|, in gray levels. Grain: Immerkaer's (1996)
    noise estimate, sqrt(pi/2) / 6 |x * L| with L = [1, -2, 1]^T [1, -2, 1], averaged over the flattest quarter of the
    film (where the gradient of the binomially smoothed film is lowest): where a real film is smooth, a synthetic one
    should be too. White noise of s gray levels reads about s there. Gradient: mean |difference| of horizontal and
    vertical neighbours, the whole film (grain and sharp edges both raise it)."""
    L, b = torch.tensor([[1.0, -2, 1], [-2, 4, -2], [1, -2, 1]]).view(1, 1, 3, 3), torch.tensor([1.0, 4, 6, 4, 1]) / 16
    out, n = [], max(1, CHUNK // 16)  # 256 images at a time: ~70 MB a float copy at 256 px (a whole split: 5-6 GB)
    for i in range(0, len(x), n):
        t = torch.from_numpy(np.ascontiguousarray(x[i:i + n])).float().unsqueeze(1)  # (B, 1, H, W), 0..255
        noise = math.sqrt(math.pi / 2) / 6 * F.conv2d(t, L).abs()[:, 0, 2:-2, 2:-2]  # (B, H - 6, W - 6)
        s = F.conv2d(F.conv2d(t, b.view(1, 1, 1, 5)), b.view(1, 1, 5, 1))[:, 0]  # smoothed, (B, H - 4, W - 4)
        g = torch.hypot(s[:, 1:-1, 2:] - s[:, 1:-1, :-2], s[:, 2:, 1:-1] - s[:, :-2, 1:-1])  # (B, H - 6, W - 6)
        flat = g <= torch.quantile(g.flatten(1), 0.25, dim=1).view(-1, 1, 1)
        d = (t.diff(dim=3).abs().mean((1, 2, 3)) + t.diff(dim=2).abs().mean((1, 2, 3))) / 2
        out.append(torch.stack([(noise * flat).sum((1, 2)) / flat.sum((1, 2)), d], 1))
    return torch.cat(out).double().numpy()


def unit_rows(f, mu=None):
    f = torch.as_tensor(f, dtype=torch.float32)
    f = f - (f.mean(1, keepdim=True) if mu is None else torch.as_tensor(mu, dtype=torch.float32))
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-8)


def pixels(x):
    """(N, H, W) uint8 -> (N, <=32*32) unit rows: cosine of per-image centred pixels = Pearson r. Chunked."""
    out = []
    for i in range(0, len(x), CHUNK):
        t = torch.from_numpy(np.ascontiguousarray(x[i:i + CHUNK])).float().unsqueeze(1)  # (B, 1, H, W)
        if t.shape[-1] > PIX:
            t = F.interpolate(t, size=(PIX, PIX), mode="bilinear", antialias=True, align_corners=False)
        out.append(unit_rows(t.flatten(1)))
    return torch.cat(out)


def nearest(q, ref, device, chunk=512):
    """-> (similarity, index) of each query row's nearest reference row; rows are unit vectors"""
    ref = ref.to(device)
    best = [(q[i:i + chunk].to(device) @ ref.T).max(1)  # (similarity, index) per chunk of queries
            for i in tqdm(range(0, len(q), chunk), desc="nearest train", leave=False, **bar_pace())]
    return torch.cat([s for s, _ in best]).cpu().double().numpy(), torch.cat([j for _, j in best]).cpu().numpy()


def bootstrap_auc(models, y, n_boot, seed, classes, specificity=0.9, baselines=None, synthetic=None):
    """models: name -> list of probs (N, K), one per training seed. Each resample draws the test images with
    replacement and one seed per model: the 95% interval holds test sampling and training noise; the point is the
    mean over seeds. Differences on the same resample: 'diff' models[1] - models[0]; with lists of baseline and
    synthetic arms, per class, 'gain': the best synthetic arm - the best baseline (best: by point AUC), and with a
    'ceiling' arm, 'gap': ceiling - the best baseline. Per class and macro: auc, sens, lo, hi; 'best': the arms."""
    names = list(models)
    point = {m: np.mean([class_scores(p, y, specificity) for p in ps], 0) for m, ps in models.items()}
    rng, reps = np.random.default_rng(seed), {m: [] for m in names}
    for _ in tqdm(range(n_boot), desc="bootstrap", leave=False, **bar_pace()):
        i = rng.integers(0, len(y), len(y))
        for m in names:
            reps[m].append(class_scores(models[m][rng.integers(len(models[m]))][i], y[i], specificity))
    reps = {m: np.array(r) for m, r in reps.items()}  # (n_boot, 2, K + 1)
    best = lambda arms: [max(arms, key=lambda m: np.nan_to_num(point[m][0, c], nan=-1))  # per class: the top AUC
                         for c in range(len(classes) + 1)]
    contrasts = {"diff": ([names[1]] * (len(classes) + 1), [names[0]] * (len(classes) + 1))}
    if baselines and synthetic:
        contrasts["gain"] = best(synthetic), best(baselines)
    if baselines and "ceiling" in models:
        contrasts["gap"] = ["ceiling"] * (len(classes) + 1), best(baselines)
    for name, (a, b) in contrasts.items():  # column c: arm a[c] - arm b[c]
        point[name] = np.stack([point[a[c]][:, c] - point[b[c]][:, c] for c in range(len(a))], 1)
        reps[name] = np.stack([reps[a[c]][:, :, c] - reps[b[c]][:, :, c] for c in range(len(a))], 2)
    res = {"best": {c: {"baseline": best(baselines)[i], "synthetic": best(synthetic)[i]} for i, c in
                    enumerate(classes + ["macro"])}} if baselines and synthetic else {}
    for m in point:
        ok = ~np.isnan(point[m])  # a class absent from test has no AUC
        lo, hi = np.full((2, 2, len(classes) + 1), np.nan)
        lo[ok], hi[ok] = np.nanpercentile(reps[m][:, ok], [2.5, 97.5], axis=0)
        bands = {"": point[m], "_lo": lo, "_hi": hi}
        res[m] = {name: {f"{q}{end}": v[i, c] for i, q in enumerate(("auc", "sens")) for end, v in bands.items()}
                  for c, name in enumerate(classes + ["macro"])}
    return res


# -----------------------------------------------------------------------------
# outputs: written to a temporary name, then renamed

def save_rows_png(rows, path, tile, cap=14):
    """rows: lists of (uint8 image, caption); each image is blown up to tile x tile with its caption (cap px) above."""
    canvas = Image.new("L", (tile * max(len(r) for r in rows), len(rows) * (tile + cap)), 0)
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        for j, (im, text) in enumerate(row):
            draw.text((j * tile + 2, i * (tile + cap) + 1), text, fill=255)
            canvas.paste(Image.fromarray(im).resize((tile, tile), Image.NEAREST), (j * tile, i * (tile + cap) + cap))
    info = PngImagePlugin.PngInfo()  # the figure holds synthetic images: say so in the file, not only in the captions
    info.add_text("synthetic", "1")
    info.add_text("Description", "contains SYNTHETIC chest X-rays generated by a diffusion model (captioned)")
    replace_file(path, lambda tmp: canvas.save(tmp, format="PNG", pnginfo=info))


def clean(v):
    if isinstance(v, dict):
        return {k: clean(u) for k, u in v.items()}
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else round(float(v), 4)
    return int(v) if isinstance(v, np.integer) else v


def label_sets(label, ys, p_s, y_po, p_po, threshold=0.5):
    """Multi-label: per label set of two or more findings that the synthetic films were drawn for (label: their
    manifest's, "Effusion|Mass"), the share of those films whose every finding the reference classifier calls (p >=
    threshold), beside the share among the real pool's films with exactly that set. -> {set: dict}"""
    out = {}
    for name in sorted(set(label[ys.sum(1) >= 2])):
        target = ys[np.flatnonzero(label == name)[0]]  # (F,) 0/1
        s, r, cols = (ys == target).all(1), (y_po == target).all(1), target == 1
        called = lambda p, m: (p[m][:, cols] >= threshold).all(1).mean() if m.any() else np.nan
        out[name] = {"n_synthetic": s.sum(), "n_real": r.sum(), "synthetic": called(p_s, s), "real": called(p_po, r)}
        out[name]["ratio"] = out[name]["synthetic"] / out[name]["real"] if out[name]["real"] else np.nan
    return out


def parse_args(argv):  # the flags, checked
    p = argparse.ArgumentParser(description="Are synthetic CXRs fit for augmentation?", formatter_class=HelpFormatter)
    # ---- data ----
    p.add_argument("--data-dir", required=True, help="prepare_data.py output (train/val/test.csv, cache.npy)")
    p.add_argument("--samples", required=True, help="sample.py output folder with manifest.csv (or the csv)")
    p.add_argument("--size", type=int, default=128, help="resolution; real and synthetic are resized to it")
    p.add_argument("--out", default="report", help="output folder; also caches the trained classifiers")
    p.add_argument("--workers", type=int, default=4, help="threads decoding PNGs")
    # ---- classifier ----
    p.add_argument("--width", type=int, default=16, help="channels of the first conv block of the reference CNN")
    p.add_argument("--epochs", type=int, default=8, help="max epochs per classifier (early stopping on val loss)")
    p.add_argument("--epoch-steps", "--steps", type=int, default=40, help="steps per epoch (0: one pass over its data)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size for training and inference")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    p.add_argument("--patience", type=int, default=3, help="stop after this many epochs without val improvement")
    # ---- evaluation ----
    p.add_argument("--repeats", type=int, default=50, help="redraws behind each realism figure and its interval")
    p.add_argument("--max-n", type=int, default=1000, help="at most this many images per class and set for realism")
    p.add_argument("--reference-share", type=float, default=0.5, help="share of the training patients the reference "
                   "classifier learns from; the others' films join val + test in the real pool that realism reads")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples behind the utility intervals")
    p.add_argument("--utility-seeds", type=int, default=3, help="training seeds per utility classifier")
    p.add_argument("--no-utility", action="store_true", help="skip training on train+synthetic and synthetic only")
    p.add_argument("--specificity", type=float, default=0.9, help="utility: sensitivity is read at this specificity")
    p.add_argument("--synthetic-share", type=float, default=0.0,
                   help="utility: share of a class's draws given to its synthetic images (0: by their number)")
    p.add_argument("--filter", default="none", choices=["none", "recognised", "new", "both"],
                   help="utility: only synthetic images called their class (recognised), not memorized (new), or both")
    p.add_argument("--baselines", action="store_true", help="utility: also the cheap ways to a better classifier "
                   "without a generator: class-weighted loss, augmentation, pseudo-labels on unlabelled train films")
    p.add_argument("--ceiling", metavar="DATA_DIR", help="utility: the same data with every real film (same val and "
                   "test): the classifier trained on it is the ceiling the others are measured against")
    p.add_argument("--pairs", type=int, default=8, help="closest synthetic/train pairs drawn in closest_pairs.png")
    # ---- system ----
    p.add_argument("--seed", type=int, default=0, help="seed for training, subsampling and the bootstrap")
    p.add_argument("--device", default="auto", help="auto (cuda, else cpu), cuda or cpu")
    args = p.parse_args(argv)
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {args.device}: no CUDA device here (use --device cpu)")
    if not Path(args.data_dir).is_dir():
        die(f"--data-dir {args.data_dir}: no such directory (run prepare_data.py first)")
    for flag in ("size", "repeats", "utility_seeds", "n_boot", "batch_size", "epochs", "max_n"):
        if getattr(args, flag) < {"max_n": 2, "size": 16}.get(flag, 1):
            die(f"--{flag.replace('_', '-')} {getattr(args, flag)}: too small")
    if not 0 < args.reference_share <= 1:
        die(f"--reference-share {args.reference_share}: must be in (0, 1]")
    if not (0 < args.specificity < 1 and 0 <= args.synthetic_share < 1):
        die(f"--specificity {args.specificity} / --synthetic-share {args.synthetic_share}: must be in (0, 1), [0, 1)")
    set_threads(torch.device(args.device))
    return args

def utility(args, real, unlabelled, synthetic, keep, classes, out, digests, settings):
    """Does adding the synthetic films help a classifier on real test films? real: (xtr, ytr, xva, yva, xte, yte, dte);
    synthetic: (xs, ys), keep: the synthetic films used (--filter). Each arm trained with --utility-seeds seeds, AUC and
    sensitivity on the real test films with bootstrap intervals; settings gets n_pseudo and n_synthetic_used."""
    (xtr, ytr, xva, yva, xte, yte, dte), x_unl, (xs, ys) = real, unlabelled, synthetic
    B, dev = args.batch_size, args.device
    seeds = [args.seed + k for k in range(args.utility_seeds)]
    xk, yk = xs[keep], ys[keep]
    x_all, y_all = np.concatenate([xtr, xk]), np.concatenate([ytr, yk])
    # arm: (films, labels, where synthetic ones start, fit() options); "train": the classes drawn alike (the rare
    # class's films oversampled); diff: "train+synth" - "train"
    sets = {"train": (xtr, ytr, None, {}), "train+synth": (x_all, y_all, len(xtr), {}),
            **({"synth": (xk, yk, None, {})} if len(np.unique(yk, axis=0)) > 1 else {})}
    if args.baselines:  # what a researcher can do without a generator, and the synthetic films on the best of it
        sets |= {"train-weighted": (xtr, ytr, None, {"weighted": True}),
                 "train-aug": (xtr, ytr, None, {"aug": True}),
                 "train+synth-aug": (x_all, y_all, len(xtr), {"aug": True}),
                 "synth>train": (xtr, ytr, None, {"init": "train+synth"})}  # trained on both, fine-tuned on real

    def fitted(m, sd):  # arm m's classifier of seed sd ("init": the arm whose classifier it starts from)
        opts = {k: fitted(v, sd) if k == "init" else v for k, v in sets[m][3].items()}
        return fit(*sets[m][:2], xva, yva, args, "real" if m == "train" else m, out, sd, digests, sets[m][2],
                   **opts)[0]
    probs = {m: [predict(fitted(m, sd), xte, B, dev, args.multi)[0] for sd in seeds] for m in sets}
    if args.baselines and len(x_unl):  # pseudo-labels: the real classifier labels the unlabelled train films; its
        probs["pseudo"], n_pseudo = [], []  # sure calls join the real films, and a classifier is trained again
        for sd in seeds:
            p_unl = predict(fitted("train", sd), x_unl, B, dev)[0]  # (N_unlabelled, K)
            sure = p_unl.max(1) >= PSEUDO_CONF
            sets["pseudo"] = (np.concatenate([xtr, x_unl[sure]]), np.concatenate([ytr, p_unl[sure].argmax(1)]),
                              None, {})
            probs["pseudo"].append(predict(fitted("pseudo", sd), xte, B, dev)[0])
            n_pseudo.append(np.bincount(p_unl[sure].argmax(1), minlength=len(classes)))
        settings["n_pseudo"] = dict(zip(classes, np.mean(n_pseudo, 0).round(1)))  # per class, mean
    if args.ceiling:  # every real film: the classifier the cheap ways and the synthetic films try to reach
        (xc, yc, _), (_, _, dte_c) = [load_split(args.ceiling, s, args.size, args.workers)
                                      for s in ("train", "test")]
        if classes_of(args.ceiling) != classes or list(dte_c["image_index"]) != list(dte["image_index"]):
            die(f"--ceiling {args.ceiling}: not the same classes and test films as --data-dir {args.data_dir}")
        sets["ceiling"] = (xc, yc, None, {})
        probs["ceiling"] = [predict(fitted("ceiling", sd), xte, B, dev)[0] for sd in seeds]
    contrast = {"baselines": [m for m in ("train", "train-weighted", "train-aug", "pseudo") if m in probs],
                "synthetic": [m for m in ("train+synth", "train+synth-aug", "synth>train") if m in probs]}
    contrast = contrast if args.baselines or args.ceiling else {}  # else "diff" says it all
    settings["n_synthetic_used"] = int(keep.sum())
    return {"n_boot": args.n_boot, "seeds": len(seeds), **contrast,
            **bootstrap_auc(probs, yte, args.n_boot, args.seed, classes, args.specificity, **contrast)}


def write_report(report, args, out):
    """report.json (every figure), and report.md: the headline table first, how to read it, the utility tables"""
    replace_file(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    per_class, summary, counts = report["per_class"], report["summary"], report["settings"]
    memo = report["memorization"]
    table = lambda header, rows: "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                                           + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"
    num = lambda v, digits=3: "-" if v is None else f"{v:.{digits}f}"
    ci = lambda d, k=1, dg=2: "-" if d["mean"] is None else num(k * d["mean"], dg) + (
        "" if d["lo"] is None else f" [{num(k * d['lo'], dg)}, {num(k * d['hi'], dg)}]")
    pair = lambda d, k=1, dg=2: f"{ci(d['synthetic'], k, dg)} / {ci(d['floor'], k, dg)}"  # synthetic / floor
    row = lambda name, d: [name, f"{d['n_synthetic']} / {d['n_real']}" + (f" ({d['n_drawn']})" if "n_drawn" in d
                                                                             else ""),
                           f"{num(d['fidelity'])} / {num(d['accuracy'])}", f"**{num(d['fd_ratio'], 2)}**",
                           pair(d["grain"]), pair(d["grainy"], 100, 0), ci(d["gradient"]["synthetic"]), pair(d["fd"]),
                           pair(d["kid"], 1e3, 1),
                           f"{num(d['diversity_features'], 2)}, {num(d['diversity_pixels'], 2)}", d["noise_like"],
                           d["memorized"]]
    md = [f"# Synthetic CXR evaluation\n\n{counts['n_synthetic']} synthetic images ({args.samples}) vs real "
          f"{args.data_dir} (train/val/test {counts['n_train']}/{counts['n_val']}/{counts['n_test']}), {args.size} px, "
          f"seed {args.seed}. "
          f"The reference classifier learnt from {counts['n_reference']} train films (macro AUC on real test films "
          f"{num(report['classifier']['macro_auc'])}); the real pool, what every figure below compares with, holds the "
          f"{counts['n_pool']} others: the rest of train, val and test.\n",
          table(["finding" if args.multi else "class", "synthetic / real pool (n drawn)",
                 "label fidelity (AUC, with vs without): synthetic / real" if args.multi else
                 "label fidelity: synthetic / real", "realism: FD ratio",
                 "texture: grain ratio [95%]: synthetic / floor", "grainy films % [95%]: synthetic / floor",
                 "gradient ratio [95%]", "FD [95%]: synthetic / floor",
                 "KID x1000 [95%]: synthetic / floor",
                 "diversity / real (features, pixels)", "noise-like", "memorized"],
                [row(name, d) for name, d in per_class.items()] + [row("**mean over classes**", summary)])
          + "\nHow to read it:",
          "- **label fidelity**: " + ("the AUC of the classifier's score for the finding (a sigmoid per finding) "
                                      "between films drawn with it and films drawn without it; real: between real "
                                      "pool films with and without it; No Finding: of minus the largest score."
                                      if args.multi else "share of images the classifier calls their class; real: "
                                      "that of the real pool."),
          f"- **FD ratio**, the one to read: Frechet distance (FD, classifier features) to real images over the floor, "
          f"real to real, at the same n; {args.repeats} redraws: mean [95%]; 1 = as real as real; classes weigh alike.",
          "- **texture**, what the classifier's features barely see: grain (Immerkaer's noise estimate in the flattest "
          "quarter of each film, gray levels) and mean |gradient| of synthetic films over real ones; 1 = as real; the "
          "floor's interval is the range real films take against real films at this n: its calibrated range. **Grainy "
          f"films**: the share grainier than {GRAINY_Q}% of real films ({100 - GRAINY_Q}% of real films are): the "
          "grain a reader sees in a few films, which a mean over smooth and grainy films hides.",
          "- **KID**: unbiased at any n (compares runs of other sizes); an interval holding 0 found no difference.",
          "- **diversity**: mean distance between two synthetic images over two real ones; << 1: the same image again.",
          f"- **noise-like**: grainier than {GRAIN_X:g}x the grainiest real film: noise, not a film. Should be 0.",
          f"- **memorized**: nearer a training image than all but {MIN_PCT:g}% of real test images (feature cosine > "
          f"{num(memo['threshold_feature_cosine'], 4)} or pixel r > {num(memo['threshold_pixel_corr'], 4)}): "
          f"~{MIN_PCT:g}% "
          "even of new images. See closest_pairs.png and memorization.csv.\n"]
    if sets := report.get("label_sets"):  # multi-label: films drawn for several findings at once
        md += ["## Label sets: films drawn for several findings, every one called (p >= 0.5)\n",
               table(["label set", "synthetic / real pool films", "all findings called: synthetic / real", "ratio"],
                     [[k.replace("|", " + "), f"{d['n_synthetic']} / {d['n_real']}",
                       f"{num(d['synthetic'], 2)} / {num(d['real'], 2)}", num(d["ratio"], 2)]
                      for k, d in sets.items()])]
    if utility := report["utility"]:
        pick = lambda d, q: {"mean": d[q], "lo": d[f"{q}_lo"], "hi": d[f"{q}_hi"]}
        names = [c for c in list(per_class) + ["macro"]  # multi-label: No Finding is no classifier's column
                 if c in utility["train"] and utility["train"][c]["auc"] is not None]
        arms = {"train": "real train" + ("" if args.multi else " (classes drawn alike)"),
                "train-weighted": "real, class-weighted loss",
                "train-aug": "real, augmented", "pseudo": "real + pseudo-labelled unlabelled films",
                "ceiling": "ceiling: every real film", "train+synth": "real + synthetic",
                "train+synth-aug": "real + synthetic, augmented",
                "synth>train": "real + synthetic, then fine-tuned on real", "synth": "synthetic only",
                "diff": "gain: real + synthetic - real", "gain": "**gain: best synthetic arm - best baseline**",
                "gap": "ceiling gap: ceiling - best baseline"}
        rows = lambda q: [[label] + [ci(pick(utility[m][c], q), 1, 3) for c in names]
                          for m, label in arms.items() if m in utility]
        share = [["share of the gap closed (gain / gap)"] + [
            num(utility["gain"][c]["auc"] / utility["gap"][c]["auc"], 2) if utility["gap"][c]["auc"] else "-"
            for c in names]] if "gap" in utility else []
        md += [f"## Utility: AUC on real test images of classifiers trained on...\n\n95% intervals over {args.n_boot} "
               f"resamples of the test images and {utility['seeds']} training seeds per classifier; "
               f"{counts['n_synthetic_used']} of the {counts['n_synthetic']} synthetic images used "
               f"(--filter {args.filter})."
               + (f" Pseudo-labels: {counts['n_pseudo']} unlabelled train films a seed (the real classifier's calls "
                  f"at p >= {PSEUDO_CONF:g})." if "n_pseudo" in counts else "")
               + (" Best arms per class: " + "; ".join(f"{c}: {b['baseline']}, {b['synthetic']}"
                                                         for c, b in utility["best"].items() if c in names) + "."
                  if "best" in utility else "") + "\n",
               table(["AUC"] + names, rows("auc") + share),
               f"\nThe same classifiers' sensitivity at specificity {args.specificity:g} (cases found at that "
               "false-alarm rate):\n", table(["sensitivity"] + names, rows("sens"))]
    replace_file(out / "report.md", lambda tmp: Path(tmp).write_text("\n".join(md)))
    print("\n".join(md))
    print(f"evaluate.py: {report['seconds']:.0f} s; wrote report.md, report.json, the figures and memorization.csv "
          f"to {out}")


def main(argv=None):
    args, t_start = parse_args(argv), time.time()
    args.multi = labels_of(args.data_dir) == "multi"  # label sets: a 0/1 column per finding (prepare_data.py)
    if args.multi and (args.baselines or args.ceiling or args.filter in ("recognised", "both") or args.synthetic_share):
        die(f"--data-dir {args.data_dir} is multi-label: --baselines, --ceiling, --filter recognised/both and "
            f"--synthetic-share are for single-label data")
    out, B, dev, rng = Path(args.out), args.batch_size, args.device, np.random.default_rng(args.seed)

    # ---- data
    (xtr, ytr, dtr, x_unl, d_unl), (xva, yva, dva), (xte, yte, dte) = [  # x_unl: the unlabelled train films
        load_split(args.data_dir, s, args.size, args.workers, s == "train") for s in ("train", "val", "test")]
    m = Path(args.samples)
    classes = classes_of(args.data_dir)  # the class names (multi-label: the findings), in class_id order (prepare.json)
    args.n_classes = len(classes)
    xs, ys, ps = load(m / "manifest.csv" if m.is_dir() or not m.suffix else m, args.size, args.workers, f"--samples "
                      f"{args.samples}: no manifest.csv (run sample.py first)", "no synthetic images", classes,
                      multi=args.multi)
    # The reference classifier learns from a share of the training patients; the films of the others join val + test
    # in the real pool, the films every per-class figure compares against, so that a few dozen test films do not
    # decide them. itr: image names, for memorization.csv; groups: one code per patient, for the realism halves.
    itr, pid = dtr["image_index"].astype(str).to_numpy(), [patients(d) for d in (dtr, dva, dte)]
    stratum = np.where(ytr.any(1), ytr.argmax(1), len(classes)) if args.multi else ytr  # label sets: first finding
    ref = reference_films(pid[0], stratum, args.reference_share, args.seed)  # (N_train,) bool
    y_po, groups = np.concatenate([ytr[~ref], yva, yte]), pd.factorize(np.concatenate([pid[0][~ref], *pid[1:]]))[0]
    # matched_realism needs a class with >= 2 synthetic films and >= 4 real ones
    if not any(min(of_class(ys, c).sum(), of_class(y_po, c).sum() // 2) >= 2 for c in range(len(classes))):
        die(f"--samples {args.samples}: no class of the synthetic images has >= 4 real pool films to compare to")
    (out / "classifiers").mkdir(parents=True, exist_ok=True)  # --out, and fit()'s cache in it: once the input is good
    print(f"real train/val/test {len(xtr)}/{len(xva)}/{len(xte)} (the reference classifier learns from {ref.sum()}, "
          f"the real pool holds {len(y_po)}), synthetic {len(xs)}, size {args.size}, device {dev}")
    report = {"settings": {**vars(args), "n_train": len(xtr), "n_val": len(xva), "n_test": len(xte),
                           "n_synthetic": len(xs), "n_reference": ref.sum(), "n_pool": len(y_po)}}

    # ---- 1. reference classifier, trained on real train films only: the ceiling for everything below
    digests = {}  # fit() hashes each distinct array once
    net, cached = fit(xtr if ref.all() else xtr[ref], ytr[ref], xva, yva, args, "real" if ref.all() else "reference",
                      out, args.seed, digests)  # at share 1 it is the utility's real arm of the first seed
    (p_tr, f_tr), (p_va, f_va), (p_te, f_te), (p_s, f_s), (_, f_unl) = [predict(net, x, B, dev, args.multi)
                                                                         for x in (xtr, xva, xte, xs, x_unl)]
    mu, scale = f_tr[ref].mean(0), np.sqrt(f_tr[ref].var(0).mean())  # centred, in units of their spread on what
    f_tr, f_va, f_te, f_s, f_unl = [(f - mu) / scale for f in (f_tr, f_va, f_te, f_s, f_unl)]  # it learnt: KID's
    # kernel needs O(1)
    report["classifier"] = {"cached": cached, "macro_auc": class_scores(p_te, yte, args.specificity)[0, -1]}

    # ---- 2. memorization: each synthetic image's nearest training image by feature cosine and by pixel correlation,
    # flagged when closer than all but MIN_PCT% of real test images are (no patient is in two splits: not copied).
    # Training images: every film the generator saw, the unlabelled ones too.
    x_seen, names_seen = np.concatenate([xtr, x_unl]), np.concatenate([itr, d_unl["image_index"].astype(str)])
    uf_seen, px_seen = unit_rows(np.concatenate([f_tr, f_unl]), 0), pixels(x_seen)  # centred: cosines spread
    px_tr, px_s, px_te = px_seen[:len(xtr)], pixels(xs), pixels(xte)
    (cos_s, jf), (r_s, jp) = nearest(unit_rows(f_s, 0), uf_seen, dev), nearest(px_s, px_seen, dev)
    cos_te, r_te = nearest(unit_rows(f_te, 0), uf_seen, dev)[0], nearest(px_te, px_seen, dev)[0]
    thr_cos, thr_r = np.percentile(cos_te, 100 - MIN_PCT), np.percentile(r_te, 100 - MIN_PCT)
    flag = (cos_s > thr_cos) | (r_s > thr_r)
    report["memorization"] = {"threshold_feature_cosine": thr_cos, "threshold_pixel_corr": thr_r, "flagged": flag.sum()}
    mem = ps[["path", "label"]].assign(nearest_train_feature=names_seen[jf], feature_cosine=cos_s.round(5),
                                       nearest_train_pixel=names_seen[jp], pixel_corr=r_s.round(5),
                                       flagged=flag.astype(int))
    replace_file(out / "memorization.csv", lambda tmp: mem.to_csv(tmp, index=False))

    # ---- 3. per class, against the real pool: label fidelity, size-matched realism and texture, diversity, noise-like
    pool = lambda tr, va, te: np.concatenate([tr[~ref], va, te])  # train films the reference did not learn, val, test
    f_po, p_po, px_po = pool(f_tr, f_va, f_te), pool(p_tr, p_va, p_te), pool(px_tr.numpy(), pixels(xva).numpy(), px_te)
    t_s, t_po = texture(xs), pool(texture(xtr), texture(xva), texture(xte))  # (N, 2): grain, gradient
    hit_s = p_s.argmax(1) == ys if not args.multi else np.ones(len(ys), bool)  # called their class (multi-label:
    hit_po = p_po.argmax(1) == y_po if not args.multi else None  # --filter recognised is for single-label data)
    px_s = px_s.numpy()
    noisy = t_s[:, 0] > GRAIN_X * t_po[:, 0].max()  # noise, not a film: grainier than any real film, by far
    share = lambda hit: hit.mean() if len(hit) else np.nan
    div = lambda a, b: (diversity(a, args.max_n, rng) / max(diversity(b, args.max_n, rng), 1e-12)  # synthetic
                        if min(len(a), len(b)) > 1 else np.nan)  # over real (real films all alike: huge, not a crash)
    per_class, draws = {}, []  # per class: its row of the report; the realism redraws of those with enough images
    # label fidelity: share of a class's films called that class; multi-label: the AUC of the finding's score between
    # films with it and films without it, synthetic (drawn with / without) and real (the pool); No Finding: of -max p
    rows = [(name, of_class(ys, c), of_class(y_po, c),
             share(hit_s[ys == c]) if not args.multi else auc(p_s[:, c], of_class(ys, c)),
             share(hit_po[y_po == c]) if not args.multi else auc(p_po[:, c], of_class(y_po, c)))
            for c, name in enumerate(classes)]
    if args.multi:
        clear_s, clear_po = ~ys.any(1), ~y_po.any(1)
        rows.append(("No Finding", clear_s, clear_po, auc(-p_s.max(1), clear_s), auc(-p_po.max(1), clear_po)))
    for name, s, r, fidelity, accuracy in rows:  # s, r: this class's synthetic films and real pool films
        if s.any() or r.any():
            d = matched_realism(f_s[s], f_po[r], t_s[s], t_po[r], groups[r], args.repeats, args.max_n, rng)
            per_class[name] = {"n_synthetic": s.sum(), "n_real": r.sum(),
                               "n_drawn": min(s.sum(), r.sum() // 2, args.max_n),
                               "fidelity": fidelity, "accuracy": accuracy, **realism(d),
                               "diversity_features": div(f_s[s], f_po[r]), "diversity_pixels": div(px_s[s], px_po[r]),
                               "memorized": flag[s].sum(), "noise_like": noisy[s].sum()}
            draws += [] if np.isnan(d).any() else [d]
    scored = [d for d in per_class.values() if d["n_synthetic"] and d["n_real"]]  # a mean over these classes
    report["per_class"] = per_class
    report["summary"] = {"n_synthetic": len(xs), "n_real": len(y_po), "memorized": flag.sum(),
                         "noise_like": noisy.sum(), **{k: np.nanmean([d[k] for d in scored])
                                                       for k in ("fidelity", "accuracy", "diversity_features",
                                                                 "diversity_pixels")},
                         **realism(np.mean(draws, 0))}  # each redraw's class average: the interval
    if args.multi:  # films drawn for several findings: is every one of them there, as often as in real films?
        report["label_sets"] = label_sets(ps["label"], ys, p_s, y_po, p_po)
    order = np.lexsort((-r_s, ~flag))[:max(1, args.pairs)]  # flagged first, then the most correlated
    save_rows_png([[(xs[i], f"synthetic {ps['label'].iat[i]}" + (" FLAGGED" if flag[i] else "")),
                    (x_seen[jp[i]], f"train {names_seen[jp[i]]} r={r_s[i]:.3f}")] for i in order],
                  out / "closest_pairs.png", 200)
    save_rows_png([[(im, f"real {n}") for im in xte[of_class(yte, c)][:4]]
                   + [(im, f"synthetic {n}") for im in xs[of_class(ys, c)][:4]]
                   for c, n in enumerate(classes) if n in per_class], out / "grid.png", 128)

    # ---- 4. utility: does adding the synthetic images help a classifier on real test images?
    keep = {"none": np.ones(len(xs), bool), "recognised": hit_s, "new": ~flag, "both": hit_s & ~flag}[args.filter]
    report["utility"] = None if args.no_utility else utility(
        args, (xtr, ytr, xva, yva, xte, yte, dte), x_unl, (xs, ys), keep, classes, out, digests, report["settings"])

    # ---- 5. report: report.json, and report.md with the headline table first
    report = clean({**report, "seconds": time.time() - t_start})
    write_report(report, args, out)
    return report


if __name__ == "__main__":
    main()
