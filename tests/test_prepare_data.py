# Tests for prepare_data.py: label file forms, filtering, patient split, path resolution, image cache, demo.
import gzip
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import prepare_data

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
ROWS = [  # (image_index, Finding Labels, patient_id)
    ("00000001_000.png", "Cardiomegaly", 1), ("00000001_001.png", "Cardiomegaly|Emphysema", 1),
    ("00000002_000.png", "No Finding", 2), ("00000003_000.png", "Effusion", 3), ("00000003_001.png", "Mass", 3),
    ("00000004_000.png", "Pneumonia", 4), ("00000005_000.png", "Pneumothorax", 5),
    ("00000006_000.png", "Atelectasis", 6),
    ("00000007_000.png", "No Finding|Effusion", 7), ("00000008_000.png", "No Finding", 8),
]


def write_labels(path, rows, trailing=True, header_trailing=True, gz=False):
    """Data_Entry-style CSV; trailing=True is the original 2017 release (every line ends with a comma)."""
    end = "," if trailing else ""
    lines = [HEADER + ("," if trailing and header_trailing else "")]
    lines += [f"{n},{lab},0,{p},50,M,PA,1024,1024,0.143,0.143{end}" for n, lab, p in rows]
    text = "\n".join(lines) + "\n"
    with (gzip.open(path, "wt") if gz else open(path, "w")) as f:
        f.write(text)
    return str(path)


def write_images(root, names, folder="images_001/images", side=40):
    d = os.path.join(root, folder)
    os.makedirs(d, exist_ok=True)
    for i, n in enumerate(names):
        x = np.random.default_rng(i).integers(0, 256, (side, side + 8), dtype=np.uint8)  # non-square on purpose
        Image.fromarray(x).save(os.path.join(d, n))
    return str(root)


def run(*argv):
    prepare_data.main([str(a) for a in argv])


def test_both_csv_forms_read_identically(tmp_path):
    forms = [write_labels(tmp_path / "a.csv", ROWS),  # 2017 original: trailing commas
             write_labels(tmp_path / "b.csv", ROWS, header_trailing=False),  # rows only with the trailing comma
             write_labels(tmp_path / "c.csv", ROWS, trailing=False),  # v2020 plain
             write_labels(tmp_path / "d.csv.gz", ROWS, trailing=False, gz=True)]  # v2020 gzipped
    ref = prepare_data.read_labels(forms[0])
    assert ref["image_index"].tolist() == [r[0] for r in ROWS]
    assert ref["patient_id"].tolist() == [r[2] for r in ROWS] and ref["patient_id"].dtype == np.int64
    for f in forms[1:]:
        pd.testing.assert_frame_equal(prepare_data.read_labels(f), ref)


def test_missing_column_error_names_it(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("Image Index,Finding Labels,Follow-up #\n00000001_000.png,Effusion,0\n")
    with pytest.raises(SystemExit, match=r"bad\.csv: no column 'Patient ID'"):
        prepare_data.read_labels(str(csv))


def test_label_normalisation_and_unknown_finding():
    M = prepare_data.parse_findings(pd.Series(["Pleural_Thickening", " pleural thickening |NO FINDING", "effusion"]))
    F = prepare_data.FINDINGS
    assert M.shape == (3, 15)
    assert M[0, F.index("Pleural_Thickening")] == 1 and M[0].sum() == 1
    assert M[1, F.index("Pleural_Thickening")] == 1 and M[1, F.index("No Finding")] == 1 and M[1].sum() == 2
    assert M[2, F.index("Effusion")] == 1 and M[2].sum() == 1
    with pytest.raises(SystemExit, match=r"labels\.csv: unknown finding 'Pneumonitis'"):
        prepare_data.parse_findings(pd.Series(["Effusion", "Effusion|Pneumonitis"]), "labels.csv")


def test_filter_keeps_only_single_selected_labels(tmp_path):
    df = prepare_data.read_labels(write_labels(tmp_path / "l.csv", ROWS))
    meta = prepare_data.select_classes(df, prepare_data.parse_findings(df["labels"]))
    got = dict(zip(meta["image_index"], zip(meta["label"], meta["class_id"])))
    assert got == {"00000001_000.png": ("Cardiomegaly", 2), "00000002_000.png": ("No Finding", 0),
                   "00000003_000.png": ("Effusion", 3), "00000004_000.png": ("Pneumonia", 4),
                   "00000005_000.png": ("Pneumothorax", 5), "00000006_000.png": ("Atelectasis", 1),
                   "00000008_000.png": ("No Finding", 0)}  # multi-label and 'Mass' rows dropped
    assert (meta[prepare_data.FINDINGS].sum(axis=1) == 1).all()


def skewed_labels(n_patients, seed=0):
    """Label rows with a realistic skew: many No Finding patients, few Pneumonia, 1-30 images per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for pid in range(1, n_patients + 1):
        main = rng.choice(6, p=[0.62, 0.12, 0.06, 0.11, 0.03, 0.06])
        for f in range(min(1 + int(rng.geometric(0.35)), 30)):
            c = main if main == 0 or rng.random() < 0.6 else 0  # finding patients also have normal films
            rows.append((f"{pid:08d}_{f:03d}.png", prepare_data.CLASSES[c], pid))
    return rows


def test_split_stratified_within_tolerance():
    rows = skewed_labels(4000)
    df = pd.DataFrame({"patient_id": [r[2] for r in rows],
                       "class_id": [prepare_data.CLASSES.index(r[1]) for r in rows]})
    assert len(df) > 8000
    for seed in (0, 1):
        sp = prepare_data.split_patients(df, seed)
        share = pd.crosstab(df["class_id"], sp, normalize="index")[prepare_data.SPLITS] * 100
        assert (share - [80, 10, 10]).abs().to_numpy().max() <= 1.5, share
        assert pd.Series(sp).groupby(df["patient_id"]).nunique().max() == 1  # patient in one split only
        pat = pd.Series(sp).groupby(df["patient_id"]).first().value_counts(normalize=True) * 100
        assert abs(pat["train"] - 80) < 2 and abs(pat["val"] - 10) < 2 and abs(pat["test"] - 10) < 2
    assert (prepare_data.split_patients(df, 0) != prepare_data.split_patients(df, 1)).any()


def test_split_deterministic_and_independent_of_disk(tmp_path):
    rows = skewed_labels(300, seed=1)
    csv = write_labels(tmp_path / "l.csv", rows)
    names = [r[0] for r in rows]
    for tree, keep in (("all", names), ("some", names[::3])):  # empty files are enough with --no-cache
        for i, n in enumerate(keep):
            d = tmp_path / tree / f"images_{i % 3 + 1:03d}" / "images"
            d.mkdir(parents=True, exist_ok=True)
            (d / n).touch()
    run("--csv", csv, "--images", tmp_path / "all", "--out", tmp_path / "o1", "--no-cache")
    run("--csv", csv, "--images", tmp_path / "all", "--out", tmp_path / "o2", "--no-cache")
    run("--csv", csv, "--images", tmp_path / "some", "--out", tmp_path / "o3", "--no-cache")
    m1, m2, m3 = (pd.read_parquet(tmp_path / o / "metadata.parquet") for o in ("o1", "o2", "o3"))
    pd.testing.assert_frame_equal(m1, m2)
    assert len(m3) < len(m1)
    both = m1.merge(m3, on="image_index")
    assert len(both) == len(m3) and (both["split_x"] == both["split_y"]).all()
    for m in (m1, m3):
        assert m.groupby("patient_id")["split"].nunique().max() == 1
        assert (m["cache_row"] == -1).all() and m["path"].map(os.path.isabs).all()
        assert set(m["split"]) == {"train", "val", "test"} and m["image_index"].is_monotonic_increasing
    assert m1["path"].str.contains("images_00[123]/images/").all()
    for sp in ("train", "val", "test"):
        csv_sp = pd.read_csv(tmp_path / "o1" / f"{sp}.csv")
        assert list(csv_sp.columns) == ["image_index", "patient_id", "label", "class_id", "path", "cache_row"]
        assert csv_sp["image_index"].tolist() == m1.loc[m1.split == sp, "image_index"].tolist()


def test_missing_images_reported(tmp_path, capsys):
    csv = write_labels(tmp_path / "l.csv", ROWS)
    present = ["00000002_000.png", "00000003_000.png", "00000008_000.png"]
    images = write_images(tmp_path / "img", present)
    run("--csv", csv, "--images", images, "--out", tmp_path / "o", "--no-cache")
    assert "4 images not found" in capsys.readouterr().out
    miss = pd.read_csv(tmp_path / "o" / "missing.csv")
    assert sorted(miss["image_index"]) == ["00000001_000.png", "00000004_000.png", "00000005_000.png",
                                           "00000006_000.png"]
    assert set(miss.columns) >= {"label", "class_id", "split", "patient_id"}
    assert sorted(pd.read_parquet(tmp_path / "o" / "metadata.parquet")["image_index"]) == present
    with pytest.raises(SystemExit, match="none of the images"):
        run("--csv", csv, "--images", write_images(tmp_path / "other", ["x.png"]), "--out", tmp_path / "o2")


def test_cache_modes_corrupt_and_contents(tmp_path):
    csv = write_labels(tmp_path / "l.csv", ROWS)
    d = tmp_path / "img" / "images_002" / "images"
    write_images(tmp_path / "img", ["00000002_000.png", "00000003_000.png", "00000006_000.png"])
    d.mkdir(parents=True)
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(d / "00000004_000.png")  # RGBA -> L
    x16 = np.tile(np.linspace(1000, 3000, 48), (48, 1)).astype(np.uint16)
    Image.fromarray(x16).save(d / "00000005_000.png")  # 16-bit, narrow range: scaled, not clipped
    (d / "00000008_000.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt
    (d / "00000001_000.png").write_bytes(b"")  # empty
    run("--csv", csv, "--images", tmp_path / "img", "--out", tmp_path / "o", "--size", 16, "--workers", 2)
    bad = pd.read_csv(tmp_path / "o" / "bad_images.csv")
    assert sorted(bad["image_index"]) == ["00000001_000.png", "00000008_000.png"] and bad["error"].notna().all()
    m = pd.read_parquet(tmp_path / "o" / "metadata.parquet")
    X = np.load(tmp_path / "o" / "cache.npy", mmap_mode="r")
    assert X.shape == (5, 16, 16) and X.dtype == np.uint8 and len(m) == 5
    assert sorted(m["cache_row"]) == list(range(5)) and "00000008_000.png" not in set(m["image_index"])
    row = dict(zip(m["image_index"], m["cache_row"]))
    for n in ("00000002_000.png", "00000003_000.png", "00000006_000.png"):
        path = m.loc[m.image_index == n, "path"].item()
        ref = np.asarray(Image.open(path).convert("L").resize((16, 16), Image.LANCZOS))
        assert np.abs(X[row[n]].astype(int) - ref).max() <= 1
    assert np.abs(X[row["00000004_000.png"]].astype(int) - 60).max() <= 1  # L = 0.299 * 200, alpha dropped
    x = X[row["00000005_000.png"]]
    assert x.min() <= 5 and x.max() >= 250 and (np.diff(x[8].astype(int)) >= 0).all()  # full range, ramp kept


def test_byte_identical_rerun_and_overwrite(tmp_path):
    csv = write_labels(tmp_path / "l.csv", ROWS)
    images = write_images(tmp_path / "img", [r[0] for r in ROWS])
    for o in ("o1", "o2"):
        run("--csv", csv, "--images", images, "--out", tmp_path / o, "--size", 8, "--workers", 1)
    files = sorted(os.listdir(tmp_path / "o1"))
    assert files == ["bad_images.csv", "cache.npy", "metadata.parquet", "missing.csv", "test.csv", "train.csv",
                     "val.csv"]
    for f in files:
        assert (tmp_path / "o1" / f).read_bytes() == (tmp_path / "o2" / f).read_bytes(), f
    before = (tmp_path / "o1" / "metadata.parquet").read_bytes()
    with pytest.raises(SystemExit, match="already holds a prepared dataset.*--overwrite"):
        run("--csv", csv, "--images", images, "--out", tmp_path / "o1", "--seed", 5)
    assert (tmp_path / "o1" / "metadata.parquet").read_bytes() == before
    run("--csv", csv, "--images", images, "--out", tmp_path / "o1", "--overwrite", "--no-cache")
    assert not (tmp_path / "o1" / "cache.npy").exists()  # no stale cache next to cache_row == -1
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "o1"))


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    run("--demo", "--out", out, "--size", 32, "--workers", 1)
    raw_csv = (out / "raw" / "Data_Entry_2017.csv").read_text().splitlines()
    assert all(line.endswith(",") for line in raw_csv)  # original NIH form, trailing commas
    m = pd.read_parquet(out / "metadata.parquet")
    assert 400 <= len(m) <= 600 and m["patient_id"].value_counts().max() > 1
    assert list(m.columns[:7]) == ["image_index", "patient_id", "label", "class_id", "split", "path", "cache_row"]
    assert set(prepare_data.FINDINGS) <= set(m.columns)
    counts = pd.crosstab(m["label"], m["split"])
    assert counts.shape == (6, 3) and (counts.to_numpy() >= 3).all()  # every class in every split
    assert counts.loc["No Finding"].sum() > 3 * counts.loc["Pneumonia"].sum()  # skewed like NIH
    assert m.groupby("patient_id")["split"].nunique().max() == 1
    X = np.load(out / "cache.npy", mmap_mode="r")
    assert X.shape == (len(m), 32, 32) and X.dtype == np.uint8
    with Image.open(m["path"].iloc[0]) as im:
        assert im.size == (256, 256) and im.text.get("synthetic", "").startswith("1")
    # standard PA orientation: at heart level the heart takes the image-RIGHT lung field, so the image-left
    # lung shows more dark (aerated) pixels there; a flipped phantom fails this
    nf = X[(m["class_id"] == 0).to_numpy()].astype(float).mean(0)
    band = nf[18:23]
    dark = band < band[:, 4:28].mean()
    assert dark[:, :16].sum() > dark[:, 16:].sum() + 5
    # the finding is visible: mean images of different classes differ clearly from No Finding
    for c in range(1, 6):
        xc = X[(m["class_id"] == c).to_numpy()].astype(float).mean(0)
        assert np.abs(xc - nf).mean() > 2, prepare_data.CLASSES[c]


def test_class_ids_agree_with_model_py():
    import model  # prepare_data.py keeps its own copy so the data step never imports torch; they must not drift
    assert prepare_data.CLASSES == model.CLASSES
