"""evaluate.py on a tiny made-up dataset whose classes are easy: class c is a bright blob at its own spot."""
import json
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import evaluate
from model import CLASSES

SIZE = 16
CENTERS = [(4, 3), (4, 8), (4, 13), (11, 3), (11, 8), (11, 13)]  # (row, col) of each class's blob
N_SPLIT = {"train": [24, 12, 12, 12, 12, 12], "val": [6] * 6, "test": [25] * 6}  # No Finding is over-represented


def draw(c, rng):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = np.array(CENTERS[c]) + rng.integers(-1, 2, 2)
    img = 50 + 150 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.8 ** 2)) + rng.normal(0, 15, (SIZE, SIZE))
    return np.clip(img, 0, 255).astype(np.uint8)


def draw_set(counts, rng):
    y = np.repeat(np.arange(len(counts)), counts)
    return np.stack([draw(c, rng) for c in y]), y


def make_data(root, cache=True, seed=0):
    """Prepared-data layout of the contract: train/val/test.csv, cache.npy, PNGs under raw/."""
    rng, rows, images = np.random.default_rng(seed), [], []
    (root / "raw").mkdir(parents=True)
    for split, counts in N_SPLIT.items():
        x, y = draw_set(counts, rng)
        for im, c in zip(x, y):
            k = len(images)
            path = root / "raw" / f"{k:08d}_000.png"
            Image.fromarray(im).save(path)
            rows.append(dict(image_index=path.name, patient_id=k, label=CLASSES[c], class_id=c, path=str(path),
                             cache_row=k if cache else -1, split=split))
            images.append(im)
    df = pd.DataFrame(rows)
    for split in N_SPLIT:
        df[df.split == split].drop(columns="split").to_csv(root / f"{split}.csv", index=False)
    if cache:
        np.save(root / "cache.npy", np.stack(images))
    return root


def write_samples(folder, x, y, labels=None):
    """sample.py's manifest; paths relative to the manifest's folder (evaluate resolves them)."""
    folder.mkdir(parents=True)
    for i, im in enumerate(x):
        Image.fromarray(im).save(folder / f"s{i:04d}.png")
    pd.DataFrame(dict(image_index=[f"s{i:04d}.png" for i in range(len(x))], patient_id="",
                      label=labels if labels is not None else [CLASSES[c] for c in y], class_id=y,
                      path=[f"s{i:04d}.png" for i in range(len(x))], synthetic=1, sampler="ddim", steps=10,
                      guidance=1.0, seed=0, checkpoint_sha256="0" * 64)).to_csv(folder / "manifest.csv", index=False)
    return folder



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def run(data, samples, out, *extra):
    return evaluate.main(["--data-dir", str(data), "--samples", str(samples), "--out", str(out), "--size", str(SIZE),
                          "--width", "8", "--epochs", "3", "--steps", "15", "--batch-size", "32", "--n-boot", "50",
                          "--workers", "1", "--device", "cpu", "--no-utility", *extra])


# ---- the metrics, checked against known answers ----

def test_auc_known_cases():
    assert evaluate.auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert evaluate.auc(np.array([0.2, 0.9, 0.1, 0.7]), np.array([0, 1, 0, 1])) == 1.0
    assert evaluate.auc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5  # ties count half
    assert np.isnan(evaluate.auc(np.array([0.1, 0.2]), np.array([1, 1])))  # no negatives: undefined


def test_frechet_matches_closed_form():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    fd = evaluate.frechet_stats(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert fd == pytest.approx(3.0 ** 2 + (2.0 - 3.0) ** 2)
    # 2x2 non-commuting covariances: for 2x2 PSD M, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))
    s1, s2 = np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([[1.0, -0.3], [-0.3, 3.0]])
    m = evaluate.sqrtm_psd(s1) @ s2 @ evaluate.sqrtm_psd(s1)
    want = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m))) + 1.0
    assert evaluate.frechet_stats(np.zeros(2), s1, np.array([1.0, 0.0]), s2) == pytest.approx(want)
    assert np.allclose(evaluate.sqrtm_psd(s1) @ evaluate.sqrtm_psd(s1), s1)
    # from samples of two diagonal Gaussians: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    rng = np.random.default_rng(0)
    a, b, mu = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25]), np.array([1.0, -1.0, 2.0])
    f1, f2 = rng.normal(0, np.sqrt(a), (40000, 3)), mu + rng.normal(0, np.sqrt(b), (40000, 3))
    assert evaluate.frechet_distance(f1, f2) == pytest.approx(6.0 + 5.0, rel=0.03)
    assert abs(evaluate.frechet_distance(f1, f1)) < 1e-6


def test_real_images_come_from_cache_or_pngs(data, tmp_path):
    x, y, names = evaluate.load_split(data, "test", SIZE)
    x_png, y_png, _ = evaluate.load_split(make_data(tmp_path / "nocache", cache=False), "test", SIZE)
    assert x.shape == (150, SIZE, SIZE) and np.array_equal(x, x_png) and np.array_equal(y, y_png)
    assert list(names[:2]) == list(pd.read_csv(data / "test.csv")["image_index"][:2])
    assert evaluate.load_split(data, "test", 8)[0].shape == (150, 8, 8)  # cache at 16, asked for 8: resized


# ---- end to end ----

def test_report_for_samples_from_the_real_distribution(data, tmp_path):
    # fresh draws from the test distribution: what a perfect generator would produce
    x, y = draw_set([8] * 6, np.random.default_rng(1))
    out = tmp_path / "report"
    R = run(data, write_samples(tmp_path / "good", x, y), out, "--pairs", "4")
    assert set(R) == {"settings", "classifier", "label_fidelity", "realism", "memorization", "utility"}
    for f in ("report.json", "report.md", "closest_pairs.png", "grid.png", "memorization.csv"):
        assert (out / f).exists()
    assert json.loads((out / "report.json").read_text()) == R
    assert "## 4. Memorization" in (out / "report.md").read_text()
    assert Image.open(out / "closest_pairs.png").size == (2 * 200, 4 * (200 + 14))  # 4 pairs: synthetic | train
    for f in ("closest_pairs.png", "grid.png"):  # figures holding synthetic images say so in their metadata
        assert Image.open(out / f).text["synthetic"] == "1"
    assert len(pd.read_csv(out / "memorization.csv")) == 48
    assert R["classifier"]["macro_auc"] > 0.95 and set(R["classifier"]["per_class"]) == set(CLASSES)
    assert R["label_fidelity"]["overall"]["synthetic"] > 0.8
    fd = R["realism"]["overall"]
    assert fd["synthetic_vs_test"] < 3 * fd["val_vs_test"]
    assert R["memorization"]["flagged"] <= 0.1 * 48
    assert not R["classifier"]["cached"]

    # junk samples (flat noise) are far above the floor; the cached classifier is reused for them
    junk = np.random.default_rng(2).integers(0, 256, (48, SIZE, SIZE)).astype(np.uint8)
    R2 = run(data, write_samples(tmp_path / "junk", junk, y), out)
    assert R2["classifier"]["cached"] and R2["classifier"]["macro_auc"] == R["classifier"]["macro_auc"]
    assert R2["realism"]["overall"]["synthetic_vs_test"] > 10 * fd["val_vs_test"]


def test_copies_of_training_images_are_flagged(data, tmp_path):
    x, y, _ = evaluate.load_split(data, "train", SIZE)
    R = run(data, write_samples(tmp_path / "copies", x[::4], y[::4]), tmp_path / "report")
    assert R["memorization"]["flagged"] == len(x[::4])
    mem = pd.read_csv(tmp_path / "report" / "memorization.csv")
    assert (mem["pixel_corr"] > 0.9999).all() and mem["flagged"].all()


def test_shuffled_labels_drop_label_fidelity_to_chance(data, tmp_path):
    x, y = draw_set([8] * 6, np.random.default_rng(3))
    labels = [CLASSES[c] for c in np.random.default_rng(4).permutation(y)]
    R = run(data, write_samples(tmp_path / "shuffled", x, y, labels), tmp_path / "report")
    assert R["label_fidelity"]["overall"]["synthetic"] < 0.4  # chance is 1/6
    assert R["label_fidelity"]["overall"]["real_test"] > 0.8


def test_utility_trains_three_classifiers_with_intervals(data, tmp_path):
    x, y = draw_set([6] * 6, np.random.default_rng(5))
    out = tmp_path / "report"
    argv = ["--data-dir", str(data), "--samples", str(write_samples(tmp_path / "s", x, y)), "--out", str(out),
            "--size", str(SIZE), "--width", "8", "--epochs", "2", "--steps", "10", "--n-boot", "40", "--device", "cpu"]
    U = evaluate.main(argv)["utility"]
    assert set(U) == {"n_boot", "train", "train+synth", "synth", "diff"}
    for m in ("train", "train+synth", "synth"):
        for name in CLASSES + ["macro"]:
            assert U[m][name]["lo"] <= U[m][name]["auc"] <= U[m][name]["hi"]
    gain = U["train+synth"]["macro"]["auc"] - U["train"]["macro"]["auc"]
    assert U["diff"]["macro"]["auc"] == pytest.approx(gain, abs=1e-3)
    assert len(list((out / "classifiers").glob("*.pt"))) == 3
    assert "train+synth - train" in (out / "report.md").read_text()


def test_changed_training_data_retrains(data, tmp_path):
    x, y = draw_set([4] * 6, np.random.default_rng(6))
    samples = write_samples(tmp_path / "s", x, y)
    run(data, samples, tmp_path / "report")
    changed = tmp_path / "changed"
    changed.mkdir()
    for split in ("train", "val", "test"):
        df = pd.read_csv(data / f"{split}.csv")
        (df.iloc[:-3] if split == "train" else df).to_csv(changed / f"{split}.csv", index=False)
    (changed / "cache.npy").symlink_to(data / "cache.npy")
    assert not run(changed, samples, tmp_path / "report")["classifier"]["cached"]
    assert len(list((tmp_path / "report" / "classifiers").glob("real-*.pt"))) == 2


def test_inception_fid_goes_through_torchmetrics(data, tmp_path, monkeypatch):
    seen, fail = [], []

    class FakeFID:  # stands in for torchmetrics' FrechetInceptionDistance: nothing is downloaded
        def __init__(self, feature):
            if fail:
                raise RuntimeError("no internet\nlong traceback text")
        def to(self, device):
            return self
        def update(self, x, real):
            seen.append((x.dtype, tuple(x.shape[1:]), real))
        def compute(self):
            return torch.tensor(12.5)

    for name in ("torchmetrics", "torchmetrics.image", "torchmetrics.image.fid"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["torchmetrics.image.fid"].FrechetInceptionDistance = FakeFID
    x, y = draw_set([2] * 6, np.random.default_rng(8))
    R = run(data, write_samples(tmp_path / "s", x, y), tmp_path / "r", "--inception")
    assert R["realism"]["inception_fid"] == 12.5
    assert {real for _, _, real in seen} == {True, False}  # real test and synthetic both fed
    assert all(dtype == torch.uint8 and shape == (3, SIZE, SIZE) for dtype, shape, _ in seen)
    fail.append(1)
    with pytest.raises(SystemExit, match="could not load the Inception weights: RuntimeError: no internet$"):
        run(data, tmp_path / "s", tmp_path / "r", "--inception")


# ---- bad input: one clear line, no traceback ----

def test_bad_input_is_one_clear_error_line(data, tmp_path, monkeypatch):
    x, y = draw_set([2] * 6, np.random.default_rng(7))
    good = write_samples(tmp_path / "good", x, y)
    with pytest.raises(SystemExit, match="no manifest.csv"):
        run(data, tmp_path / "nowhere", tmp_path / "r")
    with pytest.raises(SystemExit, match="unknown label 'Fracture'"):
        run(data, write_samples(tmp_path / "bad", x, y, ["Fracture"] + [CLASSES[c] for c in y[1:]]), tmp_path / "r")
    with pytest.raises(SystemExit, match="no such directory"):
        run(tmp_path / "no_data", good, tmp_path / "r")
    empty = make_data(tmp_path / "empty")
    pd.read_csv(empty / "test.csv").iloc[:0].to_csv(empty / "test.csv", index=False)
    with pytest.raises(SystemExit, match="test.csv: empty split"):
        run(empty, good, tmp_path / "r")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: no CUDA device"):
            run(data, good, tmp_path / "r", "--device", "cuda")
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # as if not installed; nothing is ever downloaded
    with pytest.raises(SystemExit, match="--inception needs torchmetrics"):
        run(data, good, tmp_path / "r", "--inception")
