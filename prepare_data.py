r"""
Prepare chest X-rays for class-conditional diffusion: a label file (or a folder per class) -> one label per film,
split 80/10/10 by patient (seeded, stratified), paths resolved, and a uint8 (N, size, size) cache.

    python prepare_data.py --csv Data_Entry_2017.csv --images /data/nih --out data/nih [--size 256]   # NIH, 6 classes
    python prepare_data.py --csv labels.csv --images /data/mine --out data/mine --classes "Normal,TB"   # a plain CSV
    python prepare_data.py --images chest_xray --classes "No Finding=NORMAL,Pneumonia=PNEUMONIA" --out data/k64 \
        --patient-regex "^(person\d+)_|^(NORMAL2-IM-\d+)-|^(IM-\d+)-" --size 64   # a folder per class (Kermany's)
    python prepare_data.py --demo --out data/demo [--size 32]   # phantom CXRs, seconds on a CPU
    python prepare_data.py --csv Data_Entry_2017.csv --images /data/nih --out data/nih-multi --labels multi   # every
        # film, a 0/1 column per finding (NIH's 14); --demo --labels multi: phantoms with several findings at once

Three label sources, one path after reading: the NIH label file (Image Index, Finding Labels, Patient ID: the films
labelled with exactly one of the classes), a plain CSV (image, label, optionally patient), or --images alone, where
a film's label is its folder's name (--label-regex: a group of its path) and its patient a group of --patient-regex.
--classes names the classes in class_id order ("Name" or "Name=label as written in the source"). Writes into --out:
metadata.parquet, train/val/test.csv, cache.npy (unless --no-cache), missing.csv (listed, not on disk),
bad_images.csv (on disk, unreadable), unlisted.csv (--drop-unlisted), prepare.json (the class names; a rerun of the
same inputs and settings does nothing).
"""
import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter, ImageOps, PngImagePlugin
from tqdm import tqdm

CLASSES = ["No Finding", "Atelectasis", "Cardiomegaly", "Effusion", "Pneumonia", "Pneumothorax"]  # default --classes
FINDINGS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
            "Infiltration", "Mass", "No Finding", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax"]
MULTI = [f for f in FINDINGS if f != "No Finding"]  # --labels multi: a 0/1 column per finding, none = No Finding
SPLITS, FRACS = ["train", "val", "test"], np.array([0.8, 0.1, 0.1])
NEEDED = ["Image Index", "Finding Labels", "Patient ID"]
LIST_COLS = ["image_index", "patient_id", "label", "class_id", "path", "cache_row", "synthetic"]  # + sample.py's
SIZES = [2 ** k for k in range(5, 11)]  # train.py's UNet takes powers of two >= 32; NIH films are 1024 px: no upscaling
WINDOW_PCT = (0.5, 99.5)  # >8-bit films: these percentiles -> 0..255; min/max let one hot pixel blacken the film
IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")  # what a folder-per-class layout may hold
ERR = "prepare_data.py: error:"
MULTI_P, MULTI_PATIENTS = 0.3, 160  # --demo --labels multi: P(finding) per patient; 1 in 6 patients has none


def bar_pace():  # tqdm keywords: into a log file a redraw a minute (as model.bar_pace; this script has no torch)
    return {} if sys.stderr.isatty() else {"mininterval": 60, "maxinterval": 60}


def norm(name):  # 'Pleural_Thickening' = ' pleural thickening': labels compare in any case, spaces or underscores
    return " ".join(str(name).replace("_", " ").split()).lower()


def parse_classes(text):
    """--classes "No Finding,Viral pneumonia=virus" -> (class names in class_id order, {norm(label): class_id}).
    "Name=label" maps the label as the source writes it onto the class name; "Name" alone is its own label."""
    names, labels = [], {}
    for item in text.split(","):
        name, _, label = (part.strip() for part in item.partition("="))
        if not name or not (label or name):
            raise SystemExit(f"{ERR} --classes {text!r}: an empty class name")
        if norm(name) in map(norm, names):
            raise SystemExit(f"{ERR} --classes {text!r}: class '{name}' is named twice")
        if norm(label or name) in labels:
            raise SystemExit(f"{ERR} --classes {text!r}: label '{label or name}' is given to two classes")
        labels[norm(label or name)] = len(names)
        names.append(name)
    return names, labels


def read_labels(csv):
    """NIH's Data_Entry_2017.csv (a trailing comma on every line) or Data_Entry_2017_v2020.csv[.gz] -> DataFrame."""
    try:  # index_col=False: a trailing comma must not turn 'Image Index' into the index
        df = pd.read_csv(csv, index_col=False, dtype=str, usecols=lambda c: c.strip() in NEEDED)
    except (ValueError, OSError, EOFError) as e:  # missing file, bad gzip, not a CSV
        raise SystemExit(f"{ERR} --csv {csv}: cannot read: {e}")
    df.columns = [c.strip() for c in df.columns]
    if lost := [col for col in NEEDED if col not in df.columns]:
        raise SystemExit(f"{ERR} --csv {csv}: no column '{lost[0]}'")
    pid = pd.to_numeric(df["Patient ID"], errors="coerce")
    if len(df) == 0 or pid.isna().any() or df["Image Index"].isna().any():
        raise SystemExit(f"{ERR} --csv {csv}: empty file, or empty/non-integer 'Patient ID' or 'Image Index'")
    return pd.DataFrame({"image_index": df["Image Index"].str.strip(), "patient_id": pid.astype("int64"),
                         "labels": df["Finding Labels"].fillna("")})


def drop_duplicates(df, M, csv="", what="'Patient ID' or 'Finding Labels'"):
    """An image listed again (merged label files): dropped if patient and label(s) (M) agree, else an error."""
    ref = pd.Series(np.arange(len(df))).groupby(df["image_index"].to_numpy()).transform("first").to_numpy()
    pid, lab = df["patient_id"].to_numpy(), df["labels"].to_numpy()  # ref: row of each image's first listing
    for i in np.flatnonzero((pid != pid[ref]) | (M != M[ref]).any(1))[:1]:
        raise SystemExit(f"{ERR} --csv {csv}: '{df['image_index'].iat[i]}' is listed twice with different {what}: "
                         f"{pid[ref[i]]}, '{lab[ref[i]]}' and {pid[i]}, '{lab[i]}'")
    keep = ref == np.arange(len(df))
    return df[keep].reset_index(drop=True), M[keep], int((~keep).sum())


def parse_findings(labels, csv="", extra=()):
    """'Effusion|Mass' strings -> (N, 15 + len(extra)) int64 0/1 matrix over FINDINGS + extra (the labels of
    --classes that are not NIH findings, as in an NIH-layout file of your own); an unknown name is an error."""
    codes, uniq = pd.factorize(labels)  # ~800 distinct label strings in 112k rows: parse each once
    canon = [norm(f) for f in [*FINDINGS, *extra]]
    U = np.zeros((len(uniq), len(canon)), dtype=np.int64)
    for i, s in enumerate(uniq):
        for tok in s.split("|") if s.strip() else []:  # an empty label: no finding set, an unlabelled film
            if norm(tok) not in canon:
                raise SystemExit(f"{ERR} --csv {csv}: unknown finding '{tok}'")
            U[i, canon.index(norm(tok))] = 1
    return U[codes]


def select_classes(df, M, column_class, columns=FINDINGS):
    """NIH layout: keep rows whose whole label set is one finding (a column of M) of a class (column_class: class_id
    per column, -1 for none), and the unlabelled ones (an empty label: class_id -1) -> image_index, patient_id, labels
    (that finding), class_id, the finding columns."""
    unlabelled = M.sum(1) == 0
    class_id = np.where(unlabelled, -1, np.asarray(column_class)[M.argmax(1)])
    keep = ((M.sum(1) == 1) & (class_id >= 0)) | unlabelled
    labels = np.where(unlabelled, "", np.array(columns)[M.argmax(1)])
    out = df.loc[keep, ["image_index", "patient_id"]].assign(labels=labels[keep], class_id=class_id[keep])
    out[list(columns)] = M[keep]
    return out.sort_values("image_index", kind="stable").reset_index(drop=True)


def multi_labels(df, M, csv=""):
    """NIH layout, --labels multi: every film -> image_index, patient_id, label (its findings joined by |, in MULTI
    order, or No Finding) and a 0/1 column per finding of MULTI. No Finding beside a finding, or no label: an error."""
    F, clear = M[:, [FINDINGS.index(f) for f in MULTI]], M[:, FINDINGS.index("No Finding")]  # (N, 14), (N,)
    for i in np.flatnonzero(((clear == 1) & (F.sum(1) > 0)) | (M.sum(1) == 0))[:1]:
        raise SystemExit(f"{ERR} --csv {csv}: '{df['image_index'].iat[i]}' is labelled '{df['labels'].iat[i]}': "
                         f"--labels multi takes No Finding or findings, not both, not none")
    codes, sets = np.unique(F, axis=0, return_inverse=True)  # a few hundred distinct label sets: join each once
    names = np.array(["|".join(np.array(MULTI)[row.astype(bool)]) or "No Finding" for row in codes])
    out = df[["image_index", "patient_id"]].assign(label=names[sets.ravel()])
    out[MULTI] = F
    return out.sort_values("image_index", kind="stable").reset_index(drop=True)


def header(csv):  # a label file's column names (stripped): which kind of label file it is
    with contextlib.suppress(ValueError, OSError, EOFError):  # read_labels and read_plain say what is wrong
        return list(pd.read_csv(csv, nrows=0).columns.str.strip())
    return []


def read_plain(csv):
    """A plain label file: columns image (a path under --images, or a file name found anywhere in it), label and,
    optionally, patient -> image_index, patient_id, labels; without patients every film is its own."""
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (ValueError, OSError, EOFError) as e:
        raise SystemExit(f"{ERR} --csv {csv}: cannot read: {e}")
    df.columns = [c.strip().lower() for c in df.columns]
    for col in ("image", "label"):
        if col not in df.columns:
            raise SystemExit(f"{ERR} --csv {csv}: no column '{col}' (a plain label file has image, label and "
                             f"optionally patient; NIH's has Image Index, Finding Labels, Patient ID)")
    for col in ("image",) + (("patient",) if "patient" in df.columns else ()):  # an empty label: an unlabelled film
        if (empty := np.flatnonzero(df[col].str.strip() == ""))[:1].size:
            raise SystemExit(f"{ERR} --csv {csv}: row {empty[0] + 2}: empty '{col}'")
    image = df["image"].str.strip()
    patient = df["patient"].str.strip() if "patient" in df.columns else image
    return pd.DataFrame({"image_index": image, "patient_id": patient, "labels": df["label"].str.strip()})


def read_folders(root, label_regex=None, patient_regex=None):
    """--images alone: every image file under root; its label is the name of its folder (or the first group of
    label_regex found in its path under root), its patient the first group of patient_regex that matches its file
    name (or the film itself) -> image_index (the path under root), patient_id, labels, path."""
    rows = []
    for d, dirs, files in os.walk(os.path.realpath(root)):
        dirs.sort()
        rows += [os.path.join(d, f) for f in sorted(files) if f.lower().endswith(IMAGE_TYPES)]
    rel = [os.path.relpath(p, os.path.realpath(root)) for p in rows]
    if not rows:
        raise SystemExit(f"{ERR} --images {root}: no image files ({', '.join(IMAGE_TYPES)}) under it")

    def group(regex, text, flag):
        m = re.search(regex, text)
        if m is None or all(g is None for g in m.groups()):
            raise SystemExit(f"{ERR} {flag} '{regex}': no match (or no group) in '{text}'")
        return next(g for g in m.groups() if g is not None)
    if label_regex:
        labels = [group(label_regex, r, "--label-regex") for r in rel]
    elif any(os.path.dirname(r) == "" for r in rel):
        raise SystemExit(f"{ERR} --images {root}: no class folders ('{rel[0]}' lies at its top); expected "
                         f"<class>/<image> below it, e.g. chest_xray/train/NORMAL/IM-0115-0001.jpeg, or --csv")
    else:
        labels = [os.path.basename(os.path.dirname(r)) for r in rel]
    patients = [group(patient_regex, os.path.basename(r), "--patient-regex") for r in rel] if patient_regex else rel
    return pd.DataFrame({"image_index": rel, "patient_id": patients, "labels": labels, "path": rows})


def split_patients(patient_id, Y, seed=0):
    """Patient-level 80/10/10 split, balanced per class by image count. Y: (N, C) 0/1, the classes each film shows
    (one per film, or several: a finding per column). Greedy: patients go rarest class first, larger patients first
    (shuffled among equals), each to the split with the largest relative image deficit over its classes. Depends only
    on the label rows and the seed."""
    pids, inv = np.unique(patient_id, return_inverse=True)
    V = np.zeros((len(pids), Y.shape[1]))  # (P, C) images per patient and class
    np.add.at(V, inv, Y)
    total = V.sum(0)  # (C,)
    stratum = np.where(V > 0, total, np.inf).argmin(1)  # each patient's rarest class
    order = np.random.default_rng(seed).permutation(len(pids))
    order = order[np.lexsort((-V.sum(1)[order], total[stratum[order]]))]  # stable: shuffle breaks ties
    target = np.outer(FRACS, total)  # (3, C) images wanted per split and class
    cur, side = np.zeros_like(target), np.empty(len(pids), dtype=np.int64)
    w = 1.0 / np.maximum(target, 1)
    for p in order:
        side[p] = s = int((((target - cur) * w) @ V[p]).argmax())  # relative deficit, weighted by its images
        cur[s] += V[p]
    return np.array(SPLITS)[side[inv]]


def one_hot(class_id):  # (N,) class ids, -1 for unlabelled -> (N, C + 1): unlabelled films a column of their own
    cid = np.where(class_id < 0, class_id.max() + 1, class_id)
    return np.eye(cid.max() + 1)[cid]


def index_images(root):
    """Walk --images once (images_001/images/..., or flat): file name -> absolute path; first in sorted order wins."""
    paths = {}
    for d, dirs, files in os.walk(os.path.realpath(root)):
        dirs.sort()
        for f in sorted(files):
            paths.setdefault(f, os.path.join(d, f))
    return paths


def load_gray(path, size, aspect="crop"):
    """One image -> (size, size) uint8 grayscale, antialiased, never flipped; and whether it was non-square."""
    with Image.open(path) as im:
        im.load()
        if im.mode.startswith(("I", "F")):  # I, I;16, I;16B, F ...: more than 8 bits, windowed by WINDOW_PCT
            a = np.asarray(im, dtype=np.float64)
            lo, hi = np.percentile(a, WINDOW_PCT)
            im = Image.fromarray(np.round(np.clip((a - lo) * (255.0 / max(hi - lo, 1e-12)), 0, 255)).astype(np.uint8))
        else:
            im = im.convert("L")  # RGB/RGBA/LA/P -> L (alpha dropped)
        w, h = im.size
        if w == h or aspect == "stretch":
            im = im.resize((size, size), Image.LANCZOS, reducing_gap=3.0)
        elif aspect == "pad":  # the whole film, centred between black bars
            im = ImageOps.pad(im, (size, size), Image.LANCZOS, color=0)
        else:  # crop: the centre square, at full scale
            im = ImageOps.fit(im, (size, size), Image.LANCZOS)
        return np.asarray(im, dtype=np.uint8), w != h


def _decode(job):
    try:
        return *load_gray(*job), ""
    except Exception as e:  # any corrupt file: report it, keep going
        return None, False, f"{type(e).__name__}: {e}"


def build_cache(paths, size, aspect, workers, dst):
    """Decode paths (in order) into dst, a (N', size, size) uint8 .npy -> per-path errors ('' = ok), non-square count"""
    X = np.lib.format.open_memmap(dst + ".tmp", mode="w+", dtype=np.uint8, shape=(len(paths), size, size))
    errs, jobs, r, n_rect = [], [(p, size, aspect) for p in paths], 0, 0
    with Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        it = pool.imap(_decode, jobs, chunksize=16) if pool else map(_decode, jobs)  # imap keeps the order
        for x, rect, err in tqdm(it, total=len(jobs), desc=f"cache {size}px", unit="img", **bar_pace()):
            errs.append(err)
            n_rect += rect
            if x is not None:  # good images packed at the front: row r = r-th good image
                X[r], r = x, r + 1
    if r < len(paths):  # some were unreadable: copy the packed rows into a file of the right shape
        with open(dst + ".tmp2", "wb") as fh:
            np.save(fh, X[:r])  # streamed from the memory map, never all in RAM
        os.replace(dst + ".tmp2", dst + ".tmp")
    X.flush()
    del X
    os.replace(dst + ".tmp", dst)
    return np.array(errs), n_rect


def replace_file(path, save):  # whole or not at all: save(a temporary name), then renamed
    save(path + ".tmp")
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------------------------
# phantom CXR (--demo): standard PA view, patient's right on image LEFT, heart bulging to image RIGHT. Never flipped.

def sig(x, w):  # soft step 0 -> 1 around x = 0 with edge width w (logistic, written with tanh: no overflow)
    return 0.5 + 0.5 * np.tanh(x * (0.5 / w))


def lung(u, v, s, a):
    """Soft lung mask, s=-1 image-left (patient's right) / +1 image-right, floor = that hemidiaphragm's dome."""
    cx, dome = s * 0.44 * a["w"], a["dome"][int(s > 0)]
    e = ((u - cx) / (0.36 * a["w"])) ** 2 + ((v - 0.2) / (0.2 - a["top"])) ** 2
    return sig(1 - e, 0.06) * sig(s * u - 0.11, 0.015) * sig(dome + 2.0 * (u - s * 0.3) ** 2 - v, 0.012)


def vessels(rng, n, hila):
    """Branching lung markings fanning out from the hila, drawn with PIL: (n, n) float in [0, 1]."""
    im = Image.new("L", (n, n))
    draw = ImageDraw.Draw(im)
    todo = [(x, y, ang, 0.2, 4.0) for x, y, s in hila for ang in s * np.array([0.2, 0.8, 1.4, 2.0, 2.6]) - s * 0.9
            + (s < 0) * np.pi]
    while todo:
        x, y, ang, L, wd = todo.pop()
        x2, y2 = x + L * np.cos(ang), y + L * np.sin(ang)
        draw.line([((x + 1) * n / 2, (y + 1) * n / 2), ((x2 + 1) * n / 2, (y2 + 1) * n / 2)], fill=255,
                  width=max(1, int(wd * n / 256)))
        if L > 0.05:
            todo += [(x2, y2, ang + d + rng.normal(0, 0.15), L * 0.72, wd * 0.7) for d in (-0.35, 0.35)]
    return np.asarray(im.filter(ImageFilter.GaussianBlur(1.5 * n / 256)), dtype=np.float32) / 255


def phantom(rng, a, findings, n=256):
    """One (n, n) uint8 phantom PA chest film showing findings (a set of indices into CLASSES: 1 Atelectasis ...
    5 Pneumothorax; empty: No Finding) for patient anatomy a; the one-sided findings on the side a["side"]."""
    g = np.linspace(-1, 1, n, dtype=np.float32)
    v, u = np.meshgrid(g, g, indexing="ij")  # v down, u right (image left = patient's right): (n, n)
    u, v = u - rng.normal(0, 0.015), v - rng.normal(0, 0.015)  # per-image positioning and inspiration
    a = dict(a, dome=[float(d) + rng.normal(0, 0.015) for d in a["dome"]])  # float32 stays float32
    s, shift = a["side"], 0.0
    if 1 in findings:  # atelectasis: volume loss pulls mediastinum and hemidiaphragm toward the collapsed lobe
        shift = 0.06 * s
        a["dome"] = [d - 0.1 * (k == s) for d, k in zip(a["dome"], (-1, 1))]
    body = sig(a["w"] + 0.12 - np.abs(u) - 0.5 * sig(-0.78 - v, 0.04), 0.03)  # chest wall, neck at the top
    hrx = a["heart"] * (1.6 if 2 in findings else 1.0)  # cardiomegaly: cardiothoracic ratio ~0.65 instead of ~0.42
    hcx = 0.1 + shift + 0.45 * (hrx - a["heart"])  # the left ventricle bulges to image right
    heart = sig(1 - ((u - hcx) / hrx) ** 2 - ((v - a["dome"][1] + 0.12) / 0.27) ** 2, 0.07)
    L = {k: lung(u, v, k, a) * (1 - heart) for k in (-1, 1)}  # heart and mediastinum: no aerated lung
    I, aer, ves = 0.8 * body, 0, a["ves"]  # ves: (n, n) this patient's vessel tree
    for k in (-1, 1):
        air, mk = L[k], ves * L[k]
        if 5 in findings and k == s:  # pneumothorax: lung collapsed to the hilum, black rim with no markings beyond
            hx = k * 0.2 * a["w"]
            c = sig(lung(hx + (u - hx) / 0.55, -0.05 + (v + 0.05) / 0.55, k, a) * (1 - heart) - 0.5, 0.06)
            air, mk = air * (1.3 - 0.4 * c), ves * c + 1.5 * (4 * c * (1 - c)) ** 2  # sharp visceral pleural line
        if 3 in findings and k == s:  # effusion: dependent fluid, meniscus climbing the lateral wall, angle blunted
            fluid = sig(v - (a["dome"][int(k > 0)] - 0.3 - 0.3 * ((k * u - 0.12) / 0.7) ** 2), 0.02)
            air, mk = air * (1 - fluid), mk * (1 - fluid)
        if 1 in findings and k == s:  # atelectasis: dense airless wedge (upper lobe), apex at the hilum
            wedge = sig(0.5 - np.abs(np.arctan2(-(v + 0.05), k * u - 0.1) - 1.25), 0.06) * L[k]
            air, mk = air * (1 - 0.95 * wedge), mk * (1 - wedge)
        if 4 in findings and k == s:  # pneumonia: patchy airspace opacity, mid and lower zone
            lo = Image.fromarray(rng.normal(0, 1, (10, 10)).astype(np.float32))  # coarse noise -> patches
            lo = np.asarray(lo.resize((n, n), Image.BICUBIC))
            air = air * (1 - 0.7 * sig(np.exp(-((u - k * 0.42) ** 2 + (v - 0.2) ** 2) / 0.12) + 0.3 * lo - 0.5, 0.06))
        I = I - 0.55 * air + 0.15 * mk
        aer = aer + air
    I = I + 0.05 * np.exp(-((u - 0.16 - shift) ** 2 + (v + 0.3) ** 2) / 0.006)  # aortic knob, patient's left
    I = I - 0.2 * sig(0.035 - np.abs(u - shift * sig(-v - 0.6, 0.1)), 0.01) * sig(-0.25 - v, 0.03)  # trachea
    I = I + 0.05 * sig(0.06 - np.abs(u), 0.01) * (0.5 + 0.5 * np.cos(v * 55)) * body  # spine, endplates
    t = (v - a["top"] + 0.05 - 1.1 * (np.abs(u) - 0.3) ** 2) / a["rib"]  # posterior ribs: up-and-out, then down
    d = np.abs(t - np.round(t)) * a["rib"] + np.float32(0.1) * ((t < -0.4) | (t > 9.4))  # to nearest rib centre
    ribs = sig(0.024 - d, 0.007) * (1 + 0.6 * sig(d - 0.016, 0.003))  # brighter cortex at the rib edges
    ribs = ribs * sig(np.abs(u) - 0.08, 0.02) * sig(a["w"] + 0.05 - np.abs(u), 0.02)
    clav = sig(0.035 - np.abs(v - (-0.6 - 0.25 * (np.abs(u) - 0.1) + 0.25 * (np.abs(u) - 0.4) ** 2)), 0.008)
    I = I + body * (0.07 * ribs * (0.3 + aer) + 0.15 * clav * sig(0.7 - np.abs(u), 0.03))
    I = I + 0.015 * rng.standard_normal(I.shape, dtype=np.float32)  # quantum noise
    I = np.clip(I * a["gain"] + 0.02, 0, 1) ** a["gamma"]
    return (255 * I).astype(np.uint8)


def make_demo(raw, seed=0, multi=False):
    """Write a phantom NIH-style dataset to raw/: Data_Entry_2017.csv (trailing commas) + images_001/images/*.png.
    multi: each patient shows each of the five findings independently (P = MULTI_P), so films hold several at once."""
    rng, img_dir = np.random.default_rng(seed), os.path.join(raw, "images_001", "images")
    shutil.rmtree(raw, ignore_errors=True)
    os.makedirs(img_dir)
    if multi:  # a set of findings per patient, each drawn on its own: the truth per finding is known
        sets = [set(np.flatnonzero(rng.random(5) < MULTI_P) + 1) for _ in range(MULTI_PATIENTS)]
    else:  # one class per patient, skewed like NIH
        sets = [{c} - {0} for c in rng.permutation(np.repeat(np.arange(6), [70, 16, 10, 16, 10, 12]))]
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
             "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"]
    info = PngImagePlugin.PngInfo()
    info.add_text("synthetic", "1 (phantom from prepare_data.py --demo)")
    for pid, found in enumerate(tqdm(sets, desc="demo phantoms", unit="patient", **bar_pace()), start=1):
        a = {"w": rng.uniform(0.78, 0.88), "top": rng.uniform(-0.8, -0.7), "rib": rng.uniform(0.125, 0.145),
             "dome": rng.uniform(0.38, 0.48) + np.array([0.0, 0.05]), "heart": rng.uniform(0.31, 0.36),
             "side": int(rng.choice([-1, 1])), "gain": rng.uniform(0.95, 1.1), "gamma": rng.uniform(0.9, 1.1)}
        a["ves"], age = vessels(rng, 256, [(k * 0.2 * a["w"], -0.05, k) for k in (-1, 1)]), rng.integers(20, 80)
        films = [found] * int(rng.integers(2, 6))
        if not multi and found and found != {2} and rng.random() < 0.3:  # a clear film too (single-label: resolved
            films.append(set())  # later; cardiomegaly does not clear)
        for f, y in enumerate(films):
            name, label = f"{pid:08d}_{f:03d}.png", "|".join(CLASSES[i] for i in sorted(y)) or "No Finding"
            Image.fromarray(phantom(rng, a, y)).save(os.path.join(img_dir, name), pnginfo=info)
            lines.append(f"{name},{label},{f},{pid},{age + f // 2},{'MF'[pid % 2]},PA,256,256,0.143,0.143,")
    Path(raw, "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")


def parse_args(argv):
    p = argparse.ArgumentParser(description="Prepare labelled chest X-rays (NIH, your own, or a phantom demo) for "
                                "training.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # ---- input ----
    p.add_argument("--csv", "--labels-csv", help="NIH's Data_Entry_2017[_v2020].csv[.gz], or a plain CSV with columns "
                   "image, label[, patient]; omit it to read the labels from the folders under --images")
    p.add_argument("--images", help="root holding the images (searched recursively)")
    p.add_argument("--labels", choices=["single", "multi"], default="single", help="single: one class of --classes "
                   "per film; multi: every film of an NIH label file, a 0/1 column per finding (NIH's 14)")
    p.add_argument("--classes", default=",".join(CLASSES), help="class names in class_id order, comma-separated; "
                   "Name=label maps a label as the source writes it (a folder name, say) to a class name")
    p.add_argument("--drop-unlisted", action="store_true", help="keep only films labelled with one of --classes; "
                   "the others are counted and listed in unlisted.csv (else they are an error)")
    p.add_argument("--label-regex", help="folders: the label is the first group of this regex found in the film's "
                   "path under --images (default: the name of its folder)")
    p.add_argument("--patient-regex", help="folders: the patient is the first group of this regex that matches the "
                   "film's file name (default: every film its own patient)")
    p.add_argument("--demo", action="store_true", help="generate a phantom dataset in --out/raw and prepare it")
    # ---- output ----
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already prepared in --out")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split (and of the demo)")
    # ---- cache ----
    p.add_argument("--size", type=int, default=256, help=f"cached image side in pixels, one of {SIZES}")
    p.add_argument("--aspect", choices=["crop", "pad", "stretch"], default="crop", help="non-square films: crop "
                   "(centre square; docs/results.md), pad (black bars: their shape can give the class away), stretch")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decode processes")
    p.add_argument("--no-cache", action="store_true", help="skip decoding images into cache.npy")
    args = p.parse_args(argv)
    if args.size not in SIZES:  # before any work: train.py refuses any other size, after a full decode
        raise SystemExit(f"{ERR} --size {args.size}: use one of {', '.join(map(str, SIZES))} (train.py's UNet "
                         f"takes powers of two >= 32)")
    if args.workers < 1:
        raise SystemExit(f"{ERR} --workers must be >= 1")
    for flag, regex in (("--label-regex", args.label_regex), ("--patient-regex", args.patient_regex)):
        try:
            re.compile(regex or "")
        except re.error as e:
            raise SystemExit(f"{ERR} {flag} '{regex}': not a regex ({e})")
    args.explicit = args.classes != p.get_default("classes")  # a user's own list must be learnable as a whole
    if args.labels == "multi" and args.explicit:
        raise SystemExit(f"{ERR} --classes names the classes of --labels single; --labels multi takes NIH's 14 "
                         f"findings: {', '.join(MULTI)}")
    return args


def read_source(args, names, labels, source):
    """The label file (or folders) -> (raw rows, meta: one row per film kept, unlisted films, duplicates dropped,
    the finding columns kept, what the films are)"""
    if source == "nih" and args.labels == "multi":  # every film, a 0/1 column per finding
        raw = read_labels(args.csv)
        df, M, n_dup = drop_duplicates(raw, parse_findings(raw["labels"], args.csv), args.csv)
        return raw, multi_labels(df, M, args.csv), df.iloc[:0], n_dup, MULTI, "films (every one: --labels multi)"
    if args.labels == "multi":
        raise SystemExit(f"{ERR} --labels multi reads an NIH-layout label file (Image Index, Finding Labels, Patient "
                         f"ID), not {'a plain CSV' if args.csv else 'folders'}: {args.csv or args.images}")
    if source == "nih":  # the films whose whole label set is one finding that --classes names
        extra = [lab for lab in labels if lab not in map(norm, FINDINGS)]  # your own labels in NIH's layout
        findings = FINDINGS + [names[labels[lab]] for lab in extra]  # the finding columns, named by their class
        raw = read_labels(args.csv)
        df, M, n_dup = drop_duplicates(raw, parse_findings(raw["labels"], args.csv, extra), args.csv)
        column_class = [labels.get(norm(f), -1) for f in FINDINGS + extra]
        return raw, select_classes(df, M, column_class, findings), df.iloc[:0], n_dup, findings, "single-label images"
    # one label per film, from a plain CSV or the folders
    raw = df = read_plain(args.csv) if source == "csv" else read_folders(args.images, args.label_regex,
                                                                         args.patient_regex)
    n_dup = 0
    if source == "csv":
        df, _, n_dup = drop_duplicates(raw, raw[["labels"]].to_numpy(), args.csv, "patient or label")
    df = df.assign(class_id=df["labels"].map(norm).map(labels).fillna(-1).astype(np.int64))
    unlabelled = df["labels"] == ""  # kept with class_id -1: they train the generator's null condition only
    meta, unlisted = df[(df.class_id >= 0) | unlabelled].sort_values("image_index", kind="stable").reset_index(
        drop=True), df[(df.class_id < 0) & ~unlabelled]
    if len(unlisted) and not args.drop_unlisted:
        counts = unlisted["labels"].value_counts()
        raise SystemExit(f"{ERR} {args.csv or args.images}: {len(unlisted)} films labelled with no class of "
                         f"--classes: " + ", ".join(f"'{k}' ({v})" for k, v in counts.items())
                         + "; name them in --classes (Name=label) or pass --drop-unlisted")
    if (df["patient_id"] == df["image_index"]).all():
        print("no patient ids: every film counts as its own patient. If patients have several films, they can "
              "land in two splits (leakage): give the label file a patient column, or --patient-regex")
    return raw, meta, unlisted, n_dup, [], "labelled films"


def check_classes(meta, names, multi, explicit, where):
    """A class (finding) with films of fewer than 3 patients cannot reach every split: an error for a user's own
    --classes, a note otherwise; --labels multi names such findings in one line."""
    few = []
    for c, name in enumerate(names):
        of_c = meta[MULTI[c]].to_numpy() == 1 if multi else meta["class_id"].to_numpy() == c
        n, pts = of_c.sum(), meta.loc[of_c, "patient_id"].nunique()
        why = "no film" if n == 0 else f"{n} films of {pts} patients" if pts < 3 else ""
        if why and multi:
            few.append(f"{name} ({why})")
        elif why and explicit:
            raise SystemExit(f"{ERR} --classes: class '{name}' has {why} in {where}; a patient split into train, val "
                             f"and test needs at least 3 patients")
        elif why:
            print(f"class '{name}' has {why}: not every split will hold it")
    if few:
        print(f"{len(few)} findings too rare to reach every split (the model learns little or nothing of them): "
              + ", ".join(few))
    if not multi and (meta.class_id >= 0).sum() == 0:
        raise SystemExit(f"{ERR} {where}: no film labelled with one of {names}")


def resolve_paths(meta, args, source, names):
    """-> (meta of the films found on disk, with their path; the missing ones), missing counted per split"""
    if source != "folders":  # a file name found anywhere under --images, or (a plain CSV) a path under it
        index = index_images(args.images)
        here = lambda name: os.path.realpath(os.path.join(args.images, name)) if source == "csv" and os.path.isfile(
            os.path.join(args.images, name)) else None
        meta["path"] = [here(n) or index.get(os.path.basename(n)) for n in meta["image_index"]]
    missing = meta[meta["path"].isna()]
    meta = meta[meta["path"].notna()].reset_index(drop=True)
    if len(missing):
        print(f"{len(missing)} images not found under {args.images} (missing.csv):")
        print(missing["split"].value_counts().reindex(SPLITS, fill_value=0).to_string() if args.labels == "multi"
              else pd.crosstab(missing.label, missing.split).reindex(index=names, columns=SPLITS, fill_value=0))
    if len(meta) == 0:
        raise SystemExit(f"{ERR} --images {args.images}: none of the images in {args.csv} found")
    return meta, missing


def prepared_before(out, stamp):
    """True if out holds a dataset prepared from these inputs and settings (prepare.json); another: an error"""
    old = {}
    with contextlib.suppress(OSError, ValueError), open(os.path.join(out, "prepare.json")) as fh:
        old = json.load(fh)
    before = {"classes": CLASSES, "source": "nih", "label_map": ",".join(CLASSES), "label_regex": None,
              "patient_regex": None, "drop_unlisted": False, "labels": "single"}  # what an older prepare.json
    # (from before --classes, or before --labels) means
    if not (diff := [k for k in stamp if {**before, **old}.get(k) != stamp[k]]):
        return True
    why = f"other {', '.join(diff)}" if old else "no prepare.json"
    raise SystemExit(f"{ERR} --out {out} already holds a prepared dataset (metadata.parquet) from other inputs or "
                     f"settings ({why}); pass --overwrite to replace it")


def write_dataset(out, meta, missing, unlisted, args, multi, findings, stamp):
    """cache.npy (decoded once; unreadable films out of the splits), then every table: temp name + rename;
    metadata.parquet, then prepare.json last: they mark a finished dataset. -> meta of the films kept"""
    os.makedirs(out, exist_ok=True)
    meta["cache_row"], meta["synthetic"] = np.int64(-1), np.int64(0)  # real films; sample.py's manifest has 1
    bad = meta.iloc[:0].assign(error="")
    for f in ("prepare.json", "metadata.parquet", "cache.npy"):  # --overwrite: the old dataset goes first
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    if not args.no_cache:
        errs, n_rect = build_cache(meta["path"].tolist(), args.size, args.aspect, args.workers,
                                   os.path.join(out, "cache.npy"))
        bad = meta[errs != ""].assign(error=errs[errs != ""])
        meta = meta[errs == ""].reset_index(drop=True)
        meta["cache_row"] = np.arange(len(meta), dtype=np.int64)
        print(f"{n_rect} non-square images made square (--aspect {args.aspect})")
        if len(bad):
            print(f"{len(bad)} unreadable images dropped (bad_images.csv)")
    head = ["image_index", "patient_id", "label"] + ([] if multi else ["class_id"]) + ["split"]  # every table's first
    meta = meta[head + ["path", "cache_row", "synthetic"] + findings]
    listed = [c for c in LIST_COLS if c != "class_id"] + MULTI if multi else LIST_COLS  # multi: the finding columns
    tables = {"missing.csv": missing[head], "bad_images.csv": bad[head + ["path", "error"]],
              **{f"{sp}.csv": meta.loc[meta.split == sp, listed] for sp in SPLITS}}
    if len(unlisted):
        tables["unlisted.csv"] = unlisted[["image_index", "patient_id", "labels"]].rename(columns={"labels": "label"})
    for name, table in tables.items():
        replace_file(os.path.join(out, name), lambda tmp: table.to_csv(tmp, index=False))
    table = pa.Table.from_pandas(meta, preserve_index=False).replace_schema_metadata(None)  # same inputs, same bytes
    replace_file(os.path.join(out, "metadata.parquet"), lambda tmp: pq.write_table(table, tmp))
    replace_file(os.path.join(out, "prepare.json"), lambda tmp: Path(tmp).write_text(json.dumps(stamp, indent=1)))
    return meta


def print_counts(meta, names, multi, out):
    """Films and patients per class (finding) and split; with --labels multi a film counts under each finding"""
    if multi:
        rows = [f for f in MULTI if meta[f].any()] + ["No Finding"]  # the findings it holds
        long = meta.assign(**{"No Finding": meta["label"] == "No Finding"}).melt(["patient_id", "split"], rows, "label")
        long = long[long["value"] == 1]
    else:
        rows, long = names + ([""] if (meta.class_id < 0).any() else []), meta  # "": the unlabelled films
    img = pd.crosstab(long.label, long.split).reindex(index=rows, columns=SPLITS, fill_value=0)
    pat = long.groupby(["label", "split"]).patient_id.nunique().unstack().reindex(index=rows, columns=SPLITS)
    share = (100 * img.div(img.sum(axis=1).clip(lower=1), axis=0)).round(1)
    print(pd.concat({"images": img, "patients": pat.fillna(0).astype(int), "share %": share}, axis=1)
          .rename(index={"": "(unlabelled)"}).to_string())
    print(f"total: {len(meta)} images, {meta.patient_id.nunique()} patients -> {out}")


def main(argv=None):
    args = parse_args(argv)
    out, done, multi = args.out, os.path.exists(os.path.join(args.out, "metadata.parquet")), args.labels == "multi"
    names, labels = parse_classes(args.classes)
    if args.demo:  # the phantoms are inputs like any other: never regenerated under a prepared dataset
        args.csv, args.images = os.path.join(out, "raw", "Data_Entry_2017.csv"), os.path.join(out, "raw")
        if args.overwrite or not done:
            make_demo(args.images, args.seed, multi)  # creates --out too
        elif not os.path.isfile(args.csv):
            raise SystemExit(f"{ERR} --out {out} already holds a prepared dataset (metadata.parquet), not a demo; "
                             f"pass --overwrite to replace it")
    elif not args.images:
        raise SystemExit(f"{ERR} --images is required (with --csv, or alone for a folder per class; or use --demo)")
    if not os.path.isdir(args.images):
        raise SystemExit(f"{ERR} --images {args.images}: no such directory")
    if args.csv and not os.path.isfile(args.csv):
        raise SystemExit(f"{ERR} --csv {args.csv}: no such file")

    # ---- labels -> one label (or label set) per film -> patient split, before looking at the disk: the split never
    # depends on it
    t0 = time.time()
    source = "folders" if not args.csv else "nih" if "Image Index" in header(args.csv) else "csv"
    raw, meta, unlisted, n_dup, findings, what = read_source(args, names, labels, source)
    names = MULTI if multi else names
    if multi:  # the split balances every finding, and No Finding, by image count
        Y = np.column_stack([meta[MULTI].to_numpy(), meta["label"] == "No Finding"])  # (N, 15)
    else:
        meta["label"] = np.array(names + [""])[meta["class_id"]] if len(meta) else ""  # class_id -1: "" (unlabelled)
        Y = one_hot(meta["class_id"].to_numpy()) if len(meta) else np.zeros((0, 1))  # (N, C [+ 1 unlabelled])
    check_classes(meta, names, multi, args.explicit, args.csv or args.images)
    meta["split"] = split_patients(meta["patient_id"].to_numpy(), Y, args.seed)
    assert meta.groupby("patient_id")["split"].nunique().max() == 1, "a patient is in two splits"
    assert meta["image_index"].is_unique, "an image is in two splits"  # or twice in one: never written
    n_unl = 0 if multi else (meta.class_id < 0).sum()
    print(f"{len(raw)} label rows ({n_dup} exact duplicates dropped) -> {len(meta) - n_unl} {what}"
          + (f" and {n_unl} unlabelled (an empty label: for the generator's null condition only)" if n_unl else "")
          + f" of {meta.patient_id.nunique()} patients" + (f" ({len(unlisted)} of other labels dropped: unlisted.csv)"
                                                           if len(unlisted) else ""))

    # ---- the films on disk: missing ones dropped, counted and listed ----
    meta, missing = resolve_paths(meta, args, source, names)
    print(f"labels and paths: {time.time() - t0:.1f}s")

    # ---- the same inputs and settings as the dataset in --out: nothing to do; anything else needs --overwrite ----
    listing = raw[["image_index", "patient_id", "labels"]].to_csv(index=False).encode()  # the folders' "label file"
    stamp = {"labels_sha256": hashlib.sha256(Path(args.csv).read_bytes() if args.csv else listing).hexdigest(),
             "images_sha256": hashlib.sha256("\n".join(meta["path"]).encode()).hexdigest(),  # paths, not contents
             "size": args.size, "seed": args.seed, "aspect": args.aspect, "cache": not args.no_cache,
             "classes": names, "source": source, "label_map": args.classes, "label_regex": args.label_regex,
             "patient_regex": args.patient_regex, "drop_unlisted": args.drop_unlisted, "labels": args.labels}
    if done and not args.overwrite and prepared_before(out, stamp):
        return print(f"{out} is already prepared from the same inputs and settings (prepare.json): nothing to do")

    # ---- write: the cache, the tables, prepare.json; then films and patients per class and split ----
    meta = write_dataset(out, meta, missing, unlisted, args, multi, findings, stamp)
    print_counts(meta, names, multi, out)


if __name__ == "__main__":
    main()
