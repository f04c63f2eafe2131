"""evaluate.py on a tiny made-up dataset whose classes are easy: class c is a bright blob at its own spot."""
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import evaluate
from model import CLASSES

SIZE = 16
CENTERS = [(4, 3), (4, 8), (4, 13), (11, 3), (11, 8), (11, 13)]  # (row, col) of each class's blob
N_SPLIT = {"train": [48, 24, 24, 24, 24, 24], "val": [6] * 6, "test": [25] * 6}  # No Finding is over-represented


def draw(c, rng, noise=15):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = np.array(CENTERS[c]) + rng.integers(-1, 2, 2)
    img = 50 + 150 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.8 ** 2)) + rng.normal(0, noise, (SIZE, SIZE))
    return np.clip(img, 0, 255).astype(np.uint8)


def draw_set(counts, rng, noise=15):
    y = np.repeat(np.arange(len(counts)), counts)
    return np.stack([draw(c, rng, noise) for c in y]), y


def make_data(root, cache=True, seed=0, noise=15):
    """Prepared-data layout of the contract: train/val/test.csv, cache.npy, PNGs under raw/."""
    rng, rows, images = np.random.default_rng(seed), [], []
    (root / "raw").mkdir(parents=True)
    for split, counts in N_SPLIT.items():
        x, y = draw_set(counts, rng, noise)
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
                          "--width", "8", "--epochs", "3", "--epoch-steps", "15", "--batch-size", "32", "--repeats", "30",
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


def test_kid_is_unbiased_in_set_size_where_fd_is_not():
    rng = np.random.default_rng(0)
    same = lambda n: [rng.normal(0, 1, (n, 8)) for _ in range(2)]
    for n in (10, 100):  # mean 0 for one distribution at any n: within 3 standard errors of 0 over 400 draws
        kids = np.array([evaluate.kid(*same(n)) for _ in range(400)])
        assert abs(kids.mean()) < 3 * kids.std() / np.sqrt(len(kids))
    fd_small, fd_large = (np.mean([evaluate.frechet_distance(*same(n)) for _ in range(300)]) for n in (10, 100))
    assert fd_small > 5 * fd_large > 0  # FD of one distribution with itself shrinks ~1/n: sizes must match
    shifted = [evaluate.kid(rng.normal(0, 1, (50, 8)), rng.normal(0.5, 1, (50, 8))) for _ in range(50)]
    assert np.mean(shifted) > 0.05  # a real difference stands out


def test_realism_is_size_matched_and_reads_one_for_real_images():
    rng = np.random.default_rng(1)
    real, t_real, patient = rng.normal(0, 1, (60, 6)), rng.gamma(20, 0.2, (60, 2)), np.arange(60) // 3
    for n_synth in (15, 400):  # far fewer or far more "synthetic" images than real ones: the ratios stay ~1
        d = evaluate.matched_realism(rng.normal(0, 1, (n_synth, 6)), real, rng.gamma(20, 0.2, (n_synth, 2)), t_real,
                                     patient, 200, 1000, rng)
        assert d.shape == (200, 10) and d[:, 0].mean() / d[:, 1].mean() == pytest.approx(1, abs=0.4)  # n 15: noisy
        assert d[:, [4, 5, 6, 7]].mean(0) == pytest.approx(1, abs=0.15)  # grain, gradient: synthetic and floor
        assert d[:, [8, 9]].mean(0) == pytest.approx(1 - evaluate.GRAINY_Q / 100, abs=0.05)  # grainy films: as real
    d = evaluate.matched_realism(rng.normal(1, 1, (400, 6)), real, 1.3 * rng.gamma(20, 0.2, (400, 2)), t_real,
                                 patient, 200, 1000, rng)
    assert d[:, 0].mean() > 3 * d[:, 1].mean()  # a shifted distribution is far above its floor
    assert d[:, 4].mean() == pytest.approx(1.3, abs=0.15) and d[:, 4].mean() > np.percentile(d[:, 5], 97.5)  # grain
    assert np.isnan(evaluate.matched_realism(real[:1], real, t_real[:1], t_real, patient, 5, 1000, rng)).all()
    # a quarter of the films grainy and the rest smoother than real: the mean grain reads real, the grainy share not
    t_s = rng.gamma(20, 0.2, (400, 2)) * np.where(np.arange(400) % 4 == 0, 1.5, 0.85)[:, None]
    real, t_real, patient = rng.normal(0, 1, (400, 6)), rng.gamma(20, 0.2, (400, 2)), np.arange(400) // 2
    d = evaluate.matched_realism(rng.normal(0, 1, (400, 6)), real, t_s, t_real, patient, 200, 1000, rng)
    assert d[:, 4].mean() == pytest.approx(1, abs=0.05) and d[:, 8].mean() > np.percentile(d[:, 9], 97.5)


def test_diversity_catches_the_same_image_drawn_again():
    rng = np.random.default_rng(2)
    f = rng.normal(0, 1, (300, 16))
    assert evaluate.diversity(np.repeat(f[:1], 50, 0), 1000, rng) < 1e-6  # cdist rounding, not 0
    small, large = evaluate.diversity(f[:20], 1000, rng), evaluate.diversity(f, 1000, rng)
    assert small == pytest.approx(large, rel=0.1) and large == pytest.approx(np.sqrt(2 * 16), rel=0.05)


def test_real_images_come_from_cache_or_pngs_in_chunks(data, tmp_path, monkeypatch):
    x, y, df = evaluate.load_split(data, "test", SIZE)
    x_png, y_png, _ = evaluate.load_split(make_data(tmp_path / "nocache", cache=False), "test", SIZE)
    assert x.shape == (150, SIZE, SIZE) and np.array_equal(x, x_png) and np.array_equal(y, y_png)
    assert list(df["image_index"][:2]) == list(pd.read_csv(data / "test.csv")["image_index"][:2])
    whole, px, tex = evaluate.load_split(data, "test", 8)[0], evaluate.pixels(x), evaluate.texture(x)
    monkeypatch.setattr(evaluate, "CHUNK", 7)  # NIH scale is read and reduced a chunk at a time: same result
    assert whole.shape == (150, 8, 8) and np.array_equal(evaluate.load_split(data, "test", 8)[0], whole)
    assert torch.equal(evaluate.pixels(x), px) and np.array_equal(evaluate.texture(x), tex) and tex.shape == (150, 2)


# ---- end to end ----

def test_held_out_real_images_score_as_real(data, tmp_path):
    # new draws of the real distribution in another class mix and size than the real splits: a perfect generator
    x, y = draw_set([60, 10, 20, 10, 10, 30], np.random.default_rng(1))
    out = tmp_path / "report"
    R = run(data, write_samples(tmp_path / "real", x, y), out, "--pairs", "4")
    for f in ("report.json", "report.md", "closest_pairs.png", "grid.png", "memorization.csv"):
        assert (out / f).exists()
    assert json.loads((out / "report.json").read_text()) == R
    assert Image.open(out / "closest_pairs.png").size == (2 * 200, 4 * (200 + 14))  # 4 pairs: synthetic | train
    for f in ("closest_pairs.png", "grid.png"):  # figures holding synthetic images say so in their metadata
        assert Image.open(out / f).text["synthetic"] == "1"
    assert len(pd.read_csv(out / "memorization.csv")) == len(x)
    assert R["classifier"]["macro_auc"] > 0.95 and not R["classifier"]["cached"]
    S = R["summary"]
    assert S["fd"]["floor"]["lo"] <= S["fd"]["synthetic"]["mean"] <= S["fd"]["floor"]["hi"]  # realism: as real as real
    assert S["kid"]["synthetic"]["lo"] <= 0 <= S["kid"]["synthetic"]["hi"]
    for name, d in R["per_class"].items():
        assert d["fd"]["synthetic"]["mean"] <= d["fd"]["floor"]["hi"], name
        assert d["fidelity"] >= d["accuracy"] - 0.1, name  # within a few points of real test images
        assert 0.8 < d["diversity_features"] < 1.25 and 0.8 < d["diversity_pixels"] < 1.25, name
    assert S["fidelity"] == pytest.approx(S["accuracy"], abs=0.05)
    assert S["memorized"] <= 0.04 * len(x)  # ~1% expected by construction of the threshold
    assert "realism: FD ratio" in (out / "report.md").read_text()
    # the same images with swapped labels lose their fidelity, not their realism as a whole
    swapped = [CLASSES[(c + 1) % len(CLASSES)] for c in y]
    R2 = run(data, write_samples(tmp_path / "swapped", x, y, swapped), out)
    assert R2["classifier"]["cached"] and R2["summary"]["fidelity"] < 0.1

    # junk (flat noise) is far above the floor, and draws the same-looking image again and again in features
    junk = np.random.default_rng(2).integers(0, 256, (48, SIZE, SIZE)).astype(np.uint8)
    R3 = run(data, write_samples(tmp_path / "junk", junk, np.repeat(np.arange(6), 8)), out)
    assert R3["summary"]["fd_ratio"] > 10 and R3["summary"]["fd"]["synthetic"]["lo"] > S["fd"]["floor"]["hi"]
    assert R3["summary"]["noise_like"] == len(junk) and S["noise_like"] == 0  # noise is told from films


def test_texture_flags_grain_added_to_real_films(tmp_path):
    # films as smooth as real ones: new real films read as real; the same films with 3 gray levels of grain added are
    # flagged in every class by the texture figure (grain ratio above the range real films take against real films)
    data = make_data(tmp_path / "data", noise=2)
    x, y = draw_set([20] * 6, np.random.default_rng(1), noise=2)
    R = run(data, write_samples(tmp_path / "real", x, y), tmp_path / "r")
    grainy = np.clip(x + np.random.default_rng(2).normal(0, 3, x.shape), 0, 255).round().astype(np.uint8)
    Rg = run(data, write_samples(tmp_path / "grainy", grainy, y), tmp_path / "r")
    for name in CLASSES:
        real, grain = R["per_class"][name], Rg["per_class"][name]
        assert real["grain"]["synthetic"]["lo"] <= 1 <= real["grain"]["synthetic"]["hi"], name
        assert real["grain"]["floor"]["lo"] <= 1 <= real["grain"]["floor"]["hi"], name
        assert grain["grain"]["synthetic"]["lo"] > grain["grain"]["floor"]["hi"], name
        assert grain["grain"]["synthetic"]["mean"] > 1.2, name
        assert grain["grainy"]["synthetic"]["lo"] > real["grainy"]["synthetic"]["hi"], name  # most films now grainy
        assert grain["gradient"]["synthetic"]["mean"] > real["gradient"]["synthetic"]["mean"] + 0.05, name
    assert Rg["summary"]["grain"]["synthetic"]["lo"] > R["summary"]["grain"]["synthetic"]["hi"]
    assert "texture: grain ratio" in (tmp_path / "r" / "report.md").read_text()


def test_copies_of_training_images_are_flagged(data, tmp_path):
    x, y, _ = evaluate.load_split(data, "train", SIZE)
    R = run(data, write_samples(tmp_path / "copies", x[::4], y[::4]), tmp_path / "report")
    assert R["memorization"]["flagged"] == len(x[::4])
    mem = pd.read_csv(tmp_path / "report" / "memorization.csv")
    assert (mem["pixel_corr"] > 0.9999).all() and mem["flagged"].all()


def test_utility_intervals_hold_test_resampling_and_training_seeds(data, tmp_path, monkeypatch):
    x, y = draw_set([6] * 6, np.random.default_rng(5))
    hashed, real_sha256 = [], hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda data=b"": hashed.append(memoryview(data).nbytes) or real_sha256(data))
    out = tmp_path / "report"
    argv = ["--data-dir", str(data), "--samples", str(write_samples(tmp_path / "s", x, y)), "--out", str(out),
            "--size", str(SIZE), "--width", "8", "--epochs", "2", "--epoch-steps", "10", "--n-boot", "40",
            "--utility-seeds", "2", "--repeats", "5", "--device", "cpu"]
    U = evaluate.main(argv)["utility"]
    assert set(U) == {"n_boot", "seeds", "train", "train+synth", "synth", "diff"} and U["seeds"] == 2
    for m in ("train", "train+synth", "synth"):
        for name in CLASSES + ["macro"]:
            assert U[m][name]["auc_lo"] <= U[m][name]["auc"] <= U[m][name]["auc_hi"]
    gain = U["train+synth"]["macro"]["auc"] - U["train"]["macro"]["auc"]
    assert U["diff"]["macro"]["auc"] == pytest.approx(gain, abs=1e-3)
    assert len(list((out / "classifiers").glob("*.pt"))) == 1 + 3 * 2  # the reference; three arms, two seeds each
    # the real training images are hashed once, not again for each of the 1 + 2 classifiers trained on them
    assert hashed.count(sum(N_SPLIT["train"]) * SIZE * SIZE) == 1
    assert "2 training seeds" in (out / "report.md").read_text()


def test_bootstrap_interval_widens_with_training_noise():
    rng = np.random.default_rng(0)
    K = len(CLASSES)
    y = np.repeat(np.arange(K), 30)
    clean = np.eye(K)[y] * 0.6 + rng.random((len(y), K))
    noisy = [clean + rng.normal(0, s, clean.shape) for s in (0.0, 0.8, 1.6)]  # three seeds that disagree
    one = evaluate.bootstrap_auc({"a": [clean], "b": [clean]}, y, 300, 0, CLASSES)
    many = evaluate.bootstrap_auc({"a": noisy, "b": noisy}, y, 300, 0, CLASSES)
    width = lambda r: r["a"]["macro"]["auc_hi"] - r["a"]["macro"]["auc_lo"]
    assert width(many) > 1.5 * width(one)
    assert one["diff"]["macro"]["auc"] == 0 and one["diff"]["macro"]["auc_lo"] == one["diff"]["macro"]["auc_hi"] == 0


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
    assert len(list((tmp_path / "report" / "classifiers").glob("reference-*.pt"))) == 2


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
    with pytest.raises(SystemExit, match="--repeats 0: too small"):
        run(data, good, tmp_path / "r", "--repeats", "0")
    with pytest.raises(SystemExit, match="no class of the synthetic images has >= 4 real pool"):
        run(data, write_samples(tmp_path / "one", x[:1], y[:1]), tmp_path / "r")
    cut = make_data(tmp_path / "cut")  # an interrupted copy: cache.npy cut short (np.load: "mmap length is greater")
    with open(cut / "cache.npy", "r+b") as f:
        f.truncate((cut / "cache.npy").stat().st_size // 2)
    with pytest.raises(SystemExit) as e:
        run(cut, good, tmp_path / "r")
    assert str(e.value) == (f"evaluate.py: error: {cut / 'cache.npy'} is damaged (cut short?): prepare the data "
                            "again with prepare_data.py")
    assert not (tmp_path / "r").exists()  # no refusal above left an empty report folder behind


# ---- the rare-class utility: sensitivity at a fixed specificity, how synthetic images are weighed and filtered ----

def test_sensitivity_at_a_fixed_specificity():
    neg, pos = np.arange(10) / 10, np.array([0.05, 0.85, 0.95, 0.99])  # the 90% specificity threshold is 0.8
    score, is_pos = np.concatenate([neg, pos]), np.r_[np.zeros(10, bool), np.ones(4, bool)]
    assert evaluate.sensitivity_at(score, is_pos, 0.9) == 0.75  # 3 of 4 above every negative but the top one
    assert evaluate.sensitivity_at(score, is_pos, 0.5) == 0.75 and np.isnan(evaluate.sensitivity_at(neg, neg > 2, 0.9))


def test_synthetic_share_sets_their_part_of_the_class_draws():
    y = np.r_[np.zeros(30, int), np.ones(10, int), np.ones(50, int)]  # 30 real class 0, 10 real + 50 synthetic class 1
    for share, synthetic_part in ((0.0, 50 / 60), (0.25, 0.25), (0.5, 0.5)):
        w = evaluate.draw_weights(y, 40, share, 6)
        assert w[:30].sum() == pytest.approx(0.5) and w[30:].sum() == pytest.approx(0.5)  # classes stay balanced
        assert w[40:].sum() / 0.5 == pytest.approx(synthetic_part)
        assert np.ptp(w[30:40]) == 0 and np.ptp(w[40:]) == 0  # alike within real and within synthetic


def test_filter_new_drops_copies_of_training_images_from_the_utility_arms(data, tmp_path):
    x, y, _ = evaluate.load_split(data, "train", SIZE)
    fresh, fy = draw_set([3] * 6, np.random.default_rng(9))
    samples = write_samples(tmp_path / "mix", np.concatenate([x[::8], fresh]), np.concatenate([y[::8], fy]))
    argv = ["--epochs", "1", "--epoch-steps", "5", "--n-boot", "20", "--utility-seeds", "1", "--specificity", "0.8"]
    R = evaluate.main(["--data-dir", str(data), "--samples", str(samples), "--out", str(tmp_path / "r"), "--size",
                       str(SIZE), "--width", "8", "--batch-size", "32", "--repeats", "5", "--device", "cpu", *argv,
                       "--filter", "new"])
    assert R["settings"]["n_synthetic_used"] == len(fresh) + len(x[::8]) - R["memorization"]["flagged"]
    assert R["memorization"]["flagged"] >= len(x[::8]) - 1  # the copies are flagged and left out
    assert 0 <= R["utility"]["train"]["macro"]["sens"] <= 1
    assert "sensitivity at specificity 0.8" in (tmp_path / "r" / "report.md").read_text()


def test_augmentation_turns_shifts_and_relights_but_never_flips():
    x = torch.full((64, 1, 32, 32), -0.8)
    x[:, :, 8:24, 3:12] = 0.8  # a bright shape on the image's left: the heart's side stays the heart's side
    g = torch.Generator().manual_seed(0)
    a = evaluate.augment(x, g)
    left, right = a[:, 0, :, :16].mean((1, 2)), a[:, 0, :, 16:].mean((1, 2))
    assert (left > right + 0.3).all()  # unchanged: 0.45
    assert not torch.equal(a[0], a[1]) and not torch.allclose(a, x, atol=0.05)  # each film its own small change
    r = [np.corrcoef(a[i].flatten(), x[i].flatten())[0, 1] for i in range(len(a))]
    assert min(r) > 0.7 and a.min() >= -1 and a.max() <= 1  # still the same film, in range


def test_cheap_baselines_pseudo_labels_and_the_ceiling_in_one_run(data, tmp_path):
    cut = tmp_path / "cut"  # the rare class's train films half hidden, as curve.py --rare --pool cut leaves them
    cut.mkdir()
    for name in ("val.csv", "test.csv", "cache.npy"):
        (cut / name).symlink_to(data / name)
    df = pd.read_csv(data / "train.csv")
    hide = df.index[df["class_id"] == 4][::2]
    df.assign(label=df["label"].mask(df.index.isin(hide)),
              class_id=df["class_id"].mask(df.index.isin(hide), -1)).to_csv(cut / "train.csv", index=False)
    x, y = draw_set([4] * 6, np.random.default_rng(5))
    copies = np.load(data / "cache.npy")[df.loc[hide[:3], "cache_row"]]  # 3 unlabelled films, drawn again
    samples = write_samples(tmp_path / "s", np.concatenate([x, copies]), np.concatenate([y, [4, 4, 4]]))
    argv = ["--data-dir", str(cut), "--samples", str(samples), "--size", str(SIZE), "--width", "8", "--epochs", "4",
            "--epoch-steps", "25", "--batch-size", "32", "--repeats", "5", "--n-boot", "50", "--utility-seeds", "1",
            "--device", "cpu", "--baselines"]
    R = evaluate.main(argv + ["--out", str(tmp_path / "r"), "--ceiling", str(data)])
    U = R["utility"]
    assert R["settings"]["n_train"] == len(df) - len(hide)  # the hidden films are not labelled training films
    assert 0 < sum(R["settings"]["n_pseudo"].values()) <= len(hide)  # the sure calls of the real classifier
    assert U["baselines"] == ["train", "train-weighted", "train-aug", "pseudo"]
    assert U["synthetic"] == ["train+synth", "train+synth-aug", "synth>train"]
    for arm in ("ceiling", "synth", "diff", "gain", "gap"):
        assert U[arm]["Pneumonia"]["auc"] is not None
    best = U["best"]["Pneumonia"]
    assert U["gap"]["Pneumonia"]["auc"] == pytest.approx(
        U["ceiling"]["Pneumonia"]["auc"] - U[best["baseline"]]["Pneumonia"]["auc"], abs=2e-4)
    assert U["gain"]["Pneumonia"]["auc"] == pytest.approx(
        U[best["synthetic"]]["Pneumonia"]["auc"] - U[best["baseline"]]["Pneumonia"]["auc"], abs=2e-4)
    mem = pd.read_csv(tmp_path / "r" / "memorization.csv").iloc[-3:]  # copies of films the generator saw unlabelled
    assert mem["flagged"].all() and (mem["nearest_train_pixel"] == df.loc[hide[:3], "image_index"].to_numpy()).all()
    text = (tmp_path / "r" / "report.md").read_text()
    assert "ceiling gap: ceiling - best baseline" in text and "share of the gap closed" in text
    other = tmp_path / "other"  # fewer test films: not a ceiling for these
    other.mkdir()
    for name in ("train.csv", "val.csv", "cache.npy"):
        (other / name).symlink_to(data / name)
    pd.read_csv(data / "test.csv").iloc[10:].to_csv(other / "test.csv", index=False)
    with pytest.raises(SystemExit, match="--ceiling .*: not the same classes and test films as --data-dir"):
        evaluate.main(argv + ["--out", str(tmp_path / "r2"), "--ceiling", str(other)])


# ---- multi-label (prepare_data.py --labels multi): a blob per finding, several on one film ----

FINDINGS3 = ["Atelectasis", "Effusion", "Pneumothorax"]  # at CENTERS[0..2]


def draw_multi(sets, rng, noise=15):
    """(N, 3) 0/1 -> films with a blob at the spot of each finding set (none: no blob)"""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = []
    for s in sets:
        img = 50 + rng.normal(0, noise, (SIZE, SIZE))
        for c in np.flatnonzero(s):
            cy, cx = np.array(CENTERS[c]) + rng.integers(-1, 2, 2)
            img += 150 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.8 ** 2))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def random_sets(n, rng):
    return (rng.random((n, 3)) < 0.4).astype(np.int64)


def label_of(s):
    return "|".join(np.array(FINDINGS3)[s == 1]) or "No Finding"


def test_multi_label_fidelity_per_finding_and_label_sets_read_real_films_as_real(tmp_path):
    rng, root, rows, images = np.random.default_rng(0), tmp_path / "data", [], []
    (root / "raw").mkdir(parents=True)
    for split, n in (("train", 240), ("val", 40), ("test", 80)):
        sets = random_sets(n, rng)
        for im, s in zip(draw_multi(sets, rng), sets):
            path = root / "raw" / f"{len(images):08d}_000.png"
            Image.fromarray(im).save(path)
            rows.append(dict(image_index=path.name, patient_id=len(images), label=label_of(s), path=str(path),
                             cache_row=len(images), synthetic=0, split=split, **dict(zip(FINDINGS3, s))))
            images.append(im)
    df = pd.DataFrame(rows)
    for split in ("train", "val", "test"):
        df[df.split == split].drop(columns="split").to_csv(root / f"{split}.csv", index=False)
    np.save(root / "cache.npy", np.stack(images))
    (root / "prepare.json").write_text(json.dumps({"classes": FINDINGS3, "labels": "multi"}))

    sets = random_sets(150, np.random.default_rng(1))  # held-out real films as the "synthetic" set
    x = draw_multi(sets, np.random.default_rng(2))
    folder = write_samples(tmp_path / "real", x, np.zeros(len(x), int), [label_of(s) for s in sets])
    m = pd.read_csv(folder / "manifest.csv")
    m[FINDINGS3] = sets
    m.drop(columns="class_id").to_csv(folder / "manifest.csv", index=False)
    R = run(root, folder, tmp_path / "report")
    assert list(R["per_class"]) == FINDINGS3 + ["No Finding"]
    for name, d in R["per_class"].items():  # AUC of the finding's score, films with it against films without it
        assert d["accuracy"] > 0.9 and d["fidelity"] > d["accuracy"] - 0.05, name
    assert R["label_sets"], "drawn for pairs"
    for name, d in R["label_sets"].items():
        if d["n_synthetic"] >= 10 and d["n_real"] >= 10:
            assert d["ratio"] > 0.8, name  # every finding of the set called about as often as in real films
    assert "Atelectasis + Effusion" in (tmp_path / "report" / "report.md").read_text()

    m[FINDINGS3] = np.roll(sets, 1, axis=1)  # the same films, each finding's column taken from another finding
    m.drop(columns="class_id").to_csv(folder / "manifest.csv", index=False)
    R2 = run(root, folder, tmp_path / "report")
    assert max(d["fidelity"] for n, d in R2["per_class"].items() if n != "No Finding") < 0.75
    m.drop(columns=FINDINGS3).to_csv(folder / "manifest.csv", index=False)  # a single-label manifest
    with pytest.raises(SystemExit, match="no column 'Atelectasis': --data-dir is multi-label"):
        run(root, folder, tmp_path / "report")
