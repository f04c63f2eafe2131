# Tests for prepare_data.py: label file forms, duplicates, filtering, patient split, path resolution, image cache
# (sizes, >8-bit windowing, aspect), reruns, demo.
import gzip
import json
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
    _, labels = prepare_data.parse_classes(",".join(prepare_data.CLASSES))
    column_class = [labels.get(prepare_data.norm(f), -1) for f in prepare_data.FINDINGS]
    meta = prepare_data.select_classes(df, prepare_data.parse_findings(df["labels"]), column_class)
    got = dict(zip(meta["image_index"], zip(meta["labels"], meta["class_id"])))
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
        sp = prepare_data.split_patients(df["patient_id"], prepare_data.one_hot(df["class_id"].to_numpy()), seed)
        share = pd.crosstab(df["class_id"], sp, normalize="index")[prepare_data.SPLITS] * 100
        assert (share - [80, 10, 10]).abs().to_numpy().max() <= 1.5, share
        assert pd.Series(sp).groupby(df["patient_id"]).nunique().max() == 1  # patient in one split only
        pat = pd.Series(sp).groupby(df["patient_id"]).first().value_counts(normalize=True) * 100
        assert abs(pat["train"] - 80) < 2 and abs(pat["val"] - 10) < 2 and abs(pat["test"] - 10) < 2
    Y = prepare_data.one_hot(df["class_id"].to_numpy())
    assert (prepare_data.split_patients(df["patient_id"], Y, 0) != prepare_data.split_patients(df["patient_id"], Y, 1)).any()


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
        assert list(csv_sp.columns) == ["image_index", "patient_id", "label", "class_id", "path", "cache_row",
                                        "synthetic"]
        assert csv_sp["image_index"].tolist() == m1.loc[m1.split == sp, "image_index"].tolist()
        assert (csv_sp["synthetic"] == 0).all()


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


def test_cache_modes_corrupt_and_contents(tmp_path, capsys):
    csv = write_labels(tmp_path / "l.csv", ROWS)
    d = tmp_path / "img" / "images_002" / "images"
    write_images(tmp_path / "img", ["00000002_000.png", "00000003_000.png", "00000006_000.png"])
    d.mkdir(parents=True)
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(d / "00000004_000.png")  # RGBA -> L
    x16 = np.tile(np.linspace(1000, 3000, 48), (48, 1)).astype(np.uint16)
    x16[0, 0], x16[-1, -1] = 65535, 0  # a hot and a dead pixel must not set the window
    Image.fromarray(x16).save(d / "00000005_000.png")  # 16-bit, narrow range: windowed to the full 8 bits
    (d / "00000008_000.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt
    (d / "00000001_000.png").write_bytes(b"")  # empty
    run("--csv", csv, "--images", tmp_path / "img", "--out", tmp_path / "o", "--size", 32, "--workers", 2,
        "--aspect", "stretch")
    assert "3 non-square images made square" in capsys.readouterr().out  # write_images' three 48x40 films
    bad = pd.read_csv(tmp_path / "o" / "bad_images.csv")
    assert sorted(bad["image_index"]) == ["00000001_000.png", "00000008_000.png"] and bad["error"].notna().all()
    m = pd.read_parquet(tmp_path / "o" / "metadata.parquet")
    X = np.load(tmp_path / "o" / "cache.npy", mmap_mode="r")
    assert X.shape == (5, 32, 32) and X.dtype == np.uint8 and len(m) == 5
    assert sorted(m["cache_row"]) == list(range(5)) and "00000008_000.png" not in set(m["image_index"])
    row = dict(zip(m["image_index"], m["cache_row"]))
    for n in ("00000002_000.png", "00000003_000.png", "00000006_000.png"):
        path = m.loc[m.image_index == n, "path"].item()
        ref = np.asarray(Image.open(path).convert("L").resize((32, 32), Image.LANCZOS))
        assert np.abs(X[row[n]].astype(int) - ref).max() <= 1
    assert np.abs(X[row["00000004_000.png"]].astype(int) - 60).max() <= 1  # L = 0.299 * 200, alpha dropped
    x = X[row["00000005_000.png"]].astype(int)
    assert x[16].min() <= 5 and x[16].max() >= 250 and (np.diff(x[16]) >= 0).all()  # full range, ramp kept
    assert (np.diff(x[16]) <= 16).all()  # no jump: the film is spread over the grey levels, not two of them


def test_byte_identical_rerun_and_overwrite(tmp_path):
    csv = write_labels(tmp_path / "l.csv", ROWS)
    images = write_images(tmp_path / "img", [r[0] for r in ROWS])
    for o in ("o1", "o2"):
        run("--csv", csv, "--images", images, "--out", tmp_path / o, "--size", 32, "--workers", 1)
    files = sorted(os.listdir(tmp_path / "o1"))
    assert files == ["bad_images.csv", "cache.npy", "metadata.parquet", "missing.csv", "prepare.json", "test.csv",
                     "train.csv", "val.csv"]
    for f in files:
        assert (tmp_path / "o1" / f).read_bytes() == (tmp_path / "o2" / f).read_bytes(), f
    before = (tmp_path / "o1" / "metadata.parquet").read_bytes()
    with pytest.raises(SystemExit, match="already holds a prepared dataset.*other seed.*--overwrite"):
        run("--csv", csv, "--images", images, "--out", tmp_path / "o1", "--size", 32, "--seed", 5)
    assert (tmp_path / "o1" / "metadata.parquet").read_bytes() == before
    run("--csv", csv, "--images", images, "--out", tmp_path / "o1", "--overwrite", "--no-cache")
    assert not (tmp_path / "o1" / "cache.npy").exists()  # no stale cache next to cache_row == -1
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "o1"))


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    run("--demo", "--out", out, "--size", 32, "--workers", 1)
    stamp = {f: os.stat(out / f).st_mtime_ns for f in ("raw/Data_Entry_2017.csv", "cache.npy", "metadata.parquet")}
    run("--demo", "--out", out, "--size", 32, "--workers", 1)  # the quickstart command, run a second time
    assert "already prepared from the same inputs and settings" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"already holds a prepared dataset .*\(other size\).*--overwrite"):
        run("--demo", "--out", out, "--size", 64)
    assert stamp == {f: os.stat(out / f).st_mtime_ns for f in stamp}  # nothing regenerated or rewritten
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


def test_size_refused_before_any_work(tmp_path):
    for argv in (["--csv", tmp_path / "nothing.csv", "--images", tmp_path], ["--demo"]):
        with pytest.raises(SystemExit) as e:  # a label error would come first if labels were read first
            run(*argv, "--out", tmp_path / "o", "--size", 100)
        assert str(e.value) == ("prepare_data.py: error: --size 100: use one of 32, 64, 128, 256, 512, 1024 "
                                "(train.py's UNet takes powers of two >= 32)")
        assert not (tmp_path / "o").exists()  # no phantoms generated, nothing written


def test_size_rule_agrees_with_model_py():
    import model  # a size prepare_data.py accepts is one train.py can build a UNet for, and the other way round

    def builds(size):
        for preset in sorted(model.PRESETS, key=lambda p: len(model.PRESETS[p][0])):  # shallowest first: cheapest
            try:
                return model.build_unet(size, preset) is not None
            except ValueError:
                pass
        return False
    for size in range(16, 1101):
        assert (size in prepare_data.SIZES) == builds(size), size


def test_split_csvs_concatenate_with_synthetic_and_load(tmp_path):
    import evaluate
    import train
    csv = write_labels(tmp_path / "l.csv", ROWS)
    run("--csv", csv, "--images", write_images(tmp_path / "img", [r[0] for r in ROWS]), "--out", tmp_path / "o",
        "--size", 32, "--workers", 1)
    real = pd.read_csv(tmp_path / "o" / "train.csv")
    manifest = pd.DataFrame({"image_index": ["s0.png", "s1.png"], "patient_id": None, "label": "Effusion",
                             "class_id": 3, "path": ["s0.png", "s1.png"], "synthetic": 1, "sampler": "ddim"})
    aug = pd.concat([real, manifest], ignore_index=True)  # sample.py's manifest: train.csv's columns + synthetic=1
    assert aug["synthetic"].notna().all() and aug["synthetic"].tolist() == [0] * len(real) + [1, 1]
    assert train.read_split(str(tmp_path / "o"), "train", prepare_data.CLASSES)["cache_row"].tolist() == real["cache_row"].tolist()
    x, y, _ = evaluate.load_split(str(tmp_path / "o"), "train", 32)
    assert x.shape == (len(real), 32, 32) and y.tolist() == real["class_id"].tolist()


def test_duplicate_label_rows(tmp_path, capsys):
    images = write_images(tmp_path / "img", [r[0] for r in ROWS])
    again = [("00000003_000.png", "effusion", 3), ("00000008_000.png", "No Finding", 8)]  # same image, same facts
    run("--csv", write_labels(tmp_path / "l.csv", ROWS + again), "--images", images, "--out", tmp_path / "o",
        "--no-cache")
    assert "12 label rows (2 exact duplicates dropped) -> 7 single-label images" in capsys.readouterr().out
    m = pd.read_parquet(tmp_path / "o" / "metadata.parquet")
    assert m["image_index"].is_unique and len(m) == 7
    for row, values in ((("00000003_000.png", "Effusion", 9), r"3, 'Effusion' and 9, 'Effusion'"),
                        (("00000004_000.png", "Pneumonia|Mass", 4), r"4, 'Pneumonia' and 4, 'Pneumonia\|Mass'")):
        with pytest.raises(SystemExit, match=rf"l2\.csv: '{row[0]}' is listed twice with different 'Patient ID' or "
                                             rf"'Finding Labels': {values}$"):
            run("--csv", write_labels(tmp_path / "l2.csv", ROWS + [row]), "--images", images, "--out",
                tmp_path / "o2", "--no-cache")
    assert not (tmp_path / "o2").exists()


def test_image_in_two_splits_never_written(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "drop_duplicates", lambda df, M, csv: (df, M, 0))  # a regression lets one by
    with pytest.raises(AssertionError, match="an image is in two splits"):
        run("--csv", write_labels(tmp_path / "l.csv", ROWS + [("00000002_000.png", "No Finding", 2)]), "--images",
            write_images(tmp_path / "img", [r[0] for r in ROWS]), "--out", tmp_path / "o", "--no-cache")
    assert not (tmp_path / "o" / "metadata.parquet").exists() and not (tmp_path / "o" / "train.csv").exists()


def save16(path, a):
    Image.fromarray(a.astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")  # I;16 (pillow >= 10.1) or I (10.0): 16 bits either way


def test_16_bit_windowed_by_percentiles(tmp_path):
    ramp = np.tile(np.linspace(30000, 34000, 200), (200, 1))  # a faint 16-bit film, 4000 of 65536 levels
    save16(tmp_path / "a.png", ramp)
    hot = ramp.copy()
    hot[5, 5], hot[150, 7] = 65535, 0  # one hot, one dead pixel: min/max scaling would turn the film mid-grey
    save16(tmp_path / "b.png", hot)
    a, _ = prepare_data.load_gray(tmp_path / "a.png", 32)
    b, _ = prepare_data.load_gray(tmp_path / "b.png", 32)
    assert a[16, 0] <= 3 and a[16, -1] >= 252 and (np.diff(a[16].astype(int)) > 0).all()
    assert np.abs(a.astype(int) - b)[10:, 10:].max() <= 1  # the same film away from the two bad pixels


def test_aspect_pad_crop_stretch_never_flip(tmp_path):
    wide = np.full((40, 60), 50, np.uint8)  # 60 wide, 40 high: a bright band on the image-left side
    wide[:, :10], wide[:, 10:30] = 255, 200
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(np.ascontiguousarray(wide.T)).save(tmp_path / "tall.png")  # 40 wide, 60 high
    sq = np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)
    Image.fromarray(sq).save(tmp_path / "sq.png")
    for aspect in ("pad", "crop", "stretch"):  # square 8-bit films: the same bytes as before --aspect existed
        x, rect = prepare_data.load_gray(tmp_path / "sq.png", 32, aspect)
        old = np.asarray(Image.open(tmp_path / "sq.png").convert("L").resize((32, 32), Image.LANCZOS, reducing_gap=3.0))
        assert not rect and np.array_equal(x, old)
    x, rect = prepare_data.load_gray(tmp_path / "wide.png", 32, "pad")
    assert rect and (x[:4] == 0).all() and (x[-4:] == 0).all()  # black bars above and below: the whole film kept
    assert x[16, 1] > 240 and abs(int(x[16, 12]) - 200) <= 5 and abs(int(x[16, 30]) - 50) <= 5  # not flipped
    t, _ = prepare_data.load_gray(tmp_path / "tall.png", 32, "pad")
    assert (t[:, :4] == 0).all() and (t[:, -4:] == 0).all() and t[1, 16] > 240 and abs(int(t[30, 16]) - 50) <= 5
    x, _ = prepare_data.load_gray(tmp_path / "wide.png", 32, "crop")  # the centre 40x40: columns 10..49
    assert abs(int(x[16, 1]) - 200) <= 5 and abs(int(x[16, 30]) - 50) <= 5 and x.min() >= 40  # no bars, no band
    x, _ = prepare_data.load_gray(tmp_path / "wide.png", 32, "stretch")
    old = np.asarray(Image.open(tmp_path / "wide.png").resize((32, 32), Image.LANCZOS, reducing_gap=3.0))
    assert np.array_equal(x, old)


def test_rerun_compares_inputs_and_settings(tmp_path, capsys):
    csv = write_labels(tmp_path / "l.csv", ROWS)
    images = write_images(tmp_path / "img", [r[0] for r in ROWS])
    args = ["--csv", csv, "--images", images, "--out", tmp_path / "o", "--size", 32, "--workers", 1]
    run(*args)
    assert json.loads((tmp_path / "o" / "prepare.json").read_text())["aspect"] == "crop"  # the default (README)
    m, X = pd.read_parquet(tmp_path / "o" / "metadata.parquet"), np.load(tmp_path / "o" / "cache.npy")
    crop, _ = prepare_data.load_gray(m["path"].iloc[0], 32, "crop")  # write_images' films are 48x40
    assert np.array_equal(X[m["cache_row"].iloc[0]], crop)
    before = {f: (tmp_path / "o" / f).read_bytes() for f in os.listdir(tmp_path / "o")}
    run(*args)
    assert "already prepared from the same inputs and settings (prepare.json): nothing to do" in capsys.readouterr().out
    for change, why in ((["--aspect", "pad"], "other aspect"), (["--no-cache"], "other cache"),
                        (["--size", 64], "other size")):
        with pytest.raises(SystemExit, match=rf"--out .*o already holds a prepared dataset .* from other inputs or "
                                             rf"settings \({why}\); pass --overwrite to replace it$"):
            run(*args, *change)
    write_labels(tmp_path / "l.csv", ROWS[:4] + [("00000003_001.png", "Nodule", 3)] + ROWS[5:])  # relabelled in place
    with pytest.raises(SystemExit, match=r"\(other labels_sha256\)"):
        run(*args)
    write_labels(tmp_path / "l.csv", ROWS)
    write_images(tmp_path / "img", ["00000004_000.png"], folder="images_002/images")  # more images unpacked: same
    (tmp_path / "img" / "images_001" / "images" / "00000004_000.png").unlink()  # names, other paths
    with pytest.raises(SystemExit, match=r"\(other images_sha256\)"):
        run(*args)
    assert before == {f: (tmp_path / "o" / f).read_bytes() for f in os.listdir(tmp_path / "o")}  # all refused
    (tmp_path / "o" / "prepare.json").unlink()  # a dataset from before prepare.json existed
    with pytest.raises(SystemExit, match=r"\(no prepare.json\)"):
        run(*args)
    run(*args, "--overwrite")
    assert json.loads((tmp_path / "o" / "prepare.json").read_text())["size"] == 32
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "o"))
