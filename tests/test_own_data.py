"""Your own data: any class list, a plain label file, a folder per class (Kermany's layout), and the class names
travelling from prepare_data.py through train.py, sample.py, evaluate.py and the export. Tiny films made here."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import evaluate
import export
import model
import prepare_data
import sample
import train

# Kermany's download: chest_xray/{train,test}/{NORMAL,PNEUMONIA}/; patients in the file names
NORMAL = ["IM-0001-0001", "IM-0002-0001", "IM-0003-0001", "NORMAL2-IM-0001-0001", "NORMAL2-IM-0002-0001",
          "IM-0004-0001", "IM-0005-0001", "IM-0006-0001"]
PNEUMONIA = ["person1_bacteria_1", "person1_bacteria_2", "person2_bacteria_3", "person3_bacteria_4",
             "person4_bacteria_5", "person5_virus_6", "person5_virus_7", "person6_virus_8", "person7_virus_9",
             "person8_virus_10", "person9_bacteria_11", "person10_virus_12"]
KERMANY = r"^(person\d+)_|^(NORMAL2-IM-\d+)-|^(IM-\d+)-"
TWO = "No Finding=NORMAL,Pneumonia=PNEUMONIA"
THREE = "No Finding=NORMAL,Bacterial pneumonia=bacteria,Viral pneumonia=virus"


def film(i, bright, side=40):
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[:side, :side + 10]  # landscape, as most pediatric films
    return (bright + 40 * np.sin(xx / 4 + yy / 5 + i) + rng.normal(0, 5, yy.shape)).clip(0, 255).astype(np.uint8)


def kermany_tree(root, rgb_jpeg=True):
    """The layout as shipped: split folders (ignored), a folder per class, JPEG files (RGB, as some are)."""
    for k, (cls, names) in enumerate((("NORMAL", NORMAL), ("PNEUMONIA", PNEUMONIA))):
        for i, name in enumerate(names):
            d = root / "chest_xray" / ("test" if i % 4 == 3 else "train") / cls
            d.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(film(10 * k + i, 80 + 60 * k))
            (im.convert("RGB") if rgb_jpeg else im).save(d / f"{name}.jpeg", quality=95)
    return root / "chest_xray"


def prep(*argv):
    prepare_data.main([str(a) for a in argv] + ["--size", "32", "--workers", "1"])


def test_a_folder_per_class_with_patients_from_file_names(tmp_path, capsys):
    tree = kermany_tree(tmp_path)
    prep("--images", tree, "--out", tmp_path / "k", "--classes", TWO, "--patient-regex", KERMANY)
    m = pd.read_parquet(tmp_path / "k" / "metadata.parquet")
    assert json.loads((tmp_path / "k" / "prepare.json").read_text())["classes"] == ["No Finding", "Pneumonia"]
    assert len(m) == 20 and m.groupby("label").size().to_dict() == {"No Finding": 8, "Pneumonia": 12}
    assert set(m["class_id"]) == {0, 1} and (m["label"] == np.array(["No Finding", "Pneumonia"])[m["class_id"]]).all()
    pid = dict(zip(m["image_index"].str.split("/").str[-1], m["patient_id"]))
    assert pid["person1_bacteria_1.jpeg"] == pid["person1_bacteria_2.jpeg"] == "person1"  # one patient, one split
    assert pid["NORMAL2-IM-0001-0001.jpeg"] == "NORMAL2-IM-0001" != pid["IM-0001-0001.jpeg"] == "IM-0001"
    assert m.groupby("patient_id")["split"].nunique().max() == 1 and set(m["split"]) == {"train", "val", "test"}
    x = np.load(tmp_path / "k" / "cache.npy")
    assert x.shape == (20, 32, 32) and x.dtype == np.uint8  # RGB JPEGs -> gray, centre-cropped
    assert "no patient ids" not in capsys.readouterr().out

    # the same films labelled by their file names: three classes, one regex
    prep("--images", tree, "--out", tmp_path / "k3", "--classes", THREE, "--patient-regex", KERMANY,
         "--label-regex", "(NORMAL|bacteria|virus)")
    m3 = pd.read_parquet(tmp_path / "k3" / "metadata.parquet")
    assert m3.groupby("label").size().to_dict() == {"Bacterial pneumonia": 6, "No Finding": 8, "Viral pneumonia": 6}
    assert json.loads((tmp_path / "k3" / "prepare.json").read_text())["classes"] == [
        "No Finding", "Bacterial pneumonia", "Viral pneumonia"]


def test_a_plain_label_file_reads_as_the_folders_do(tmp_path, capsys):
    tree = kermany_tree(tmp_path)
    prep("--images", tree, "--out", tmp_path / "f", "--classes", TWO, "--patient-regex", KERMANY)
    folders = pd.read_parquet(tmp_path / "f" / "metadata.parquet")
    labels = folders[["image_index", "patient_id"]].assign(
        label=np.where(folders["label"] == "Pneumonia", "PNEUMONIA", "NORMAL")).rename(
        columns={"image_index": "image", "patient_id": "patient"})
    labels.sample(frac=1, random_state=0).to_csv(tmp_path / "labels.csv", index=False)  # any row order
    prep("--csv", tmp_path / "labels.csv", "--images", tree, "--out", tmp_path / "c", "--classes", TWO)
    plain = pd.read_parquet(tmp_path / "c" / "metadata.parquet")
    cols = ["image_index", "patient_id", "label", "class_id", "split", "path", "cache_row"]
    pd.testing.assert_frame_equal(plain[cols], folders[cols])
    assert np.array_equal(np.load(tmp_path / "c" / "cache.npy"), np.load(tmp_path / "f" / "cache.npy"))

    # file names alone (found anywhere under --images), no patient column: every film its own patient, and it says so
    labels.assign(image=labels["image"].str.split("/").str[-1]).drop(columns="patient").to_csv(
        tmp_path / "names.csv", index=False)
    capsys.readouterr()
    prep("--csv", tmp_path / "names.csv", "--images", tree, "--out", tmp_path / "n", "--classes", TWO)
    assert "no patient ids: every film counts as its own patient" in capsys.readouterr().out
    n = pd.read_parquet(tmp_path / "n" / "metadata.parquet")
    assert len(n) == 20 and n["patient_id"].is_unique and n["path"].isin(folders["path"]).all()


@pytest.mark.parametrize("change, says", [  # says: the fragments the one line must hold
    (dict(classes="No Finding=NORMAL"), ["12 films labelled with no class of --classes: 'PNEUMONIA' (12); name them "
                                         "in --classes (Name=label) or pass --drop-unlisted"]),
    (dict(classes=TWO + ",Effusion"), ["--classes: class 'Effusion' has no film in"]),
    (dict(classes="No Finding=NORMAL,No finding=PNEUMONIA"), ["class 'No finding' is named twice"]),
    (dict(classes="A=NORMAL,B=normal"), ["label 'normal' is given to two classes"]),
    (dict(patient_regex=r"^(patient\d+)_"), [r"--patient-regex '^(patient\d+)_': no match (or no group) in 'IM-"]),
    (dict(patient_regex="(unclosed"), ["--patient-regex '(unclosed': not a regex"]),
    (dict(label_regex="(covid)"), ["--label-regex '(covid)': no match (or no group) in '"]),
    (dict(flat=True), ["no class folders ('IM-0001-0001.jpeg' lies at its top)"]),
    (dict(few=True), ["class 'Pneumonia' has 2 films of 1 patients in", "at least 3 patients"]),
    (dict(csv="image,finding\nx.png,NORMAL\n"), ["l.csv: no column 'label'"]),
    (dict(csv="image,label\n,NORMAL\n"), ["l.csv: row 2: empty 'image'"]),
])
def test_bad_own_data_is_one_clear_line_and_writes_nothing(tmp_path, change, says):
    tree = kermany_tree(tmp_path)
    if change.get("flat"):
        tree = tree / "train" / "NORMAL"
    if change.get("few"):
        for f in sorted((tree / "train" / "PNEUMONIA").glob("*.jpeg"))[2:] + list((tree / "test" / "PNEUMONIA").glob("*")):
            f.unlink()
    argv = ["--images", tree, "--out", tmp_path / "o", "--classes", change.get("classes", TWO),
            "--patient-regex", change.get("patient_regex", KERMANY)]
    if change.get("label_regex"):
        argv += ["--label-regex", change["label_regex"]]
    if change.get("csv"):
        (tmp_path / "l.csv").write_text(change["csv"])
        argv += ["--csv", tmp_path / "l.csv"]
    with pytest.raises(SystemExit) as e:
        prep(*argv)
    msg = str(e.value)
    assert msg.startswith("prepare_data.py: error: ") and "\n" not in msg and all(f in msg for f in says), msg
    assert not (tmp_path / "o").exists()


def test_films_with_an_empty_label_are_kept_unlabelled_for_the_generator_alone(tmp_path, capsys):
    tree = kermany_tree(tmp_path)
    prep("--images", tree, "--out", tmp_path / "f", "--classes", TWO, "--patient-regex", KERMANY)
    m = pd.read_parquet(tmp_path / "f" / "metadata.parquet")
    hidden = m["label"].eq("Pneumonia") & m["image_index"].str.contains("virus")  # 6 films of 5 patients
    m[["image_index", "patient_id"]].assign(label=np.where(hidden, "", np.where(m["label"] == "Pneumonia", "PNEUMONIA",
        "NORMAL"))).rename(columns={"image_index": "image", "patient_id": "patient"}).to_csv(tmp_path / "l.csv",
                                                                                             index=False)
    capsys.readouterr()
    prep("--csv", tmp_path / "l.csv", "--images", tree, "--out", tmp_path / "u", "--classes", TWO)
    out = capsys.readouterr().out
    assert "-> 14 labelled films and 6 unlabelled (an empty label" in out and "(unlabelled)" in out
    u = pd.read_parquet(tmp_path / "u" / "metadata.parquet")
    assert len(u) == 20 and (u["class_id"] == -1).sum() == 6 and set(u.loc[u["class_id"] == -1, "label"]) == {""}
    assert u.groupby("patient_id")["split"].nunique().max() == 1  # unlabelled or not, a patient stays in one split
    train_csv = pd.read_csv(tmp_path / "u" / "train.csv")
    n_unl = int((train_csv["class_id"] == -1).sum())
    assert n_unl >= 1 and train_csv.loc[train_csv["class_id"] == -1, "label"].isna().all()
    x, y, _, x_unl, _ = evaluate.load_split(str(tmp_path / "u"), "train", 32, unlabelled=True)  # classifiers: labelled
    assert len(x_unl) == n_unl and len(x) == len(train_csv) - n_unl and set(y) <= {0, 1}
    y = train.read_split(str(tmp_path / "u"), "train", ["No Finding", "Pneumonia"])["class_id"]
    assert (y == 2).sum() == n_unl and set(y) <= {0, 1, 2}  # unlabelled: the null label (2 classes, then null)
    train.main(["--data-dir", str(tmp_path / "u"), "--out-dir", str(tmp_path / "run"), "--batch-size", "8",
                "--max-steps", "2", "--preset", "tiny", "--eval-every", "1", "--log-every", "1", "--device", "cpu"])
    assert f"({n_unl} unlabelled: null label only)" in capsys.readouterr().out


def test_drop_unlisted_keeps_the_named_classes_and_lists_the_rest(tmp_path, capsys):
    prep("--images", kermany_tree(tmp_path), "--out", tmp_path / "o", "--classes", "Normal=NORMAL",
         "--patient-regex", KERMANY, "--drop-unlisted")
    assert "(12 of other labels dropped: unlisted.csv)" in capsys.readouterr().out
    m, unlisted = pd.read_parquet(tmp_path / "o" / "metadata.parquet"), pd.read_csv(tmp_path / "o" / "unlisted.csv")
    assert (m["label"] == "Normal").all() and len(m) == 8 and (m["class_id"] == 0).all()
    assert len(unlisted) == 12 and set(unlisted["label"]) == {"PNEUMONIA"}


def test_nih_label_file_with_a_class_list_of_its_findings(tmp_path):
    from test_prepare_data import skewed_labels, write_labels
    rows = skewed_labels(80)
    (tmp_path / "img").mkdir()
    for name, _, _ in rows:  # empty files: enough with --no-cache
        (tmp_path / "img" / name).touch()
    argv = ["--csv", write_labels(tmp_path / "l.csv", rows), "--images", tmp_path / "img", "--no-cache"]
    with pytest.raises(SystemExit, match="--classes: class 'Tuberculosis' has no film in"):
        prep(*argv, "--out", tmp_path / "o", "--classes", "No Finding,Tuberculosis")
    prep(*argv, "--out", tmp_path / "o", "--classes", "Normal=No Finding,Effusion")
    m = pd.read_parquet(tmp_path / "o" / "metadata.parquet")
    want = {"Normal": sum(r[1] == "No Finding" for r in rows), "Effusion": sum(r[1] == "Effusion" for r in rows)}
    assert m.groupby("label").size().to_dict() == want and set(zip(m["label"], m["class_id"])) == {
        ("Normal", 0), ("Effusion", 1)}
    assert set(prepare_data.FINDINGS) <= set(m.columns)  # NIH's finding columns stay


def test_own_classes_end_to_end_prepare_train_sample_evaluate_export(tmp_path):
    prep("--images", kermany_tree(tmp_path), "--out", tmp_path / "d", "--classes", THREE, "--patient-regex",
         KERMANY, "--label-regex", "(NORMAL|bacteria|virus)")
    run = tmp_path / "run"
    train.main(["--data-dir", str(tmp_path / "d"), "--out-dir", str(run), "--batch-size", "4", "--max-steps", "2",
                "--preset", "tiny", "--eval-every", "1", "--log-every", "1", "--sample-every", "2", "--device", "cpu"])
    ckpt = model.load_checkpoint(str(run))
    assert ckpt["classes"] == ["No Finding", "Bacterial pneumonia", "Viral pneumonia"]
    assert ckpt["unet_config"]["num_class_embeds"] == 4  # three classes and the null class
    export.main(["--ckpt", str(run)])
    card = (run / "README.md").read_text()
    assert "| 2 | Viral pneumonia |" in card and "| 3 | null label" in card
    with pytest.raises(SystemExit, match="--class 'Effusion': not a class of .*; choose from No Finding, Bacterial "
                                         "pneumonia, Viral pneumonia"):
        sample.main(["--ckpt", str(run), "--class", "Effusion", "--out", str(tmp_path / "s")])
    manifest = sample.main(["--ckpt", str(run), "--class", "viral pneumonia", "--class", "No Finding", "--n", "3",
                            "--steps", "2", "--out", str(tmp_path / "s")])
    assert manifest["label"].tolist() == ["Viral pneumonia"] * 3 + ["No Finding"] * 3
    assert manifest["class_id"].tolist() == [2] * 3 + [0] * 3
    assert (tmp_path / "s" / "grid_viral_pneumonia.png").exists()
    R = evaluate.main(["--data-dir", str(tmp_path / "d"), "--samples", str(tmp_path / "s"), "--size", "32",
                       "--out", str(tmp_path / "r"), "--width", "8", "--epochs", "1", "--epoch-steps", "3",
                       "--repeats", "5", "--no-utility", "--device", "cpu"])
    assert list(R["per_class"]) == ["No Finding", "Bacterial pneumonia", "Viral pneumonia"]
    assert R["per_class"]["Viral pneumonia"]["n_synthetic"] == 3


def test_a_prepared_folder_from_before_class_lists_still_loads_as_nih_six(tmp_path, capsys):
    from test_prepare_data import ROWS, write_images, write_labels
    argv = ["--csv", write_labels(tmp_path / "l.csv", ROWS), "--images",
            write_images(tmp_path / "img", [r[0] for r in ROWS]), "--out", tmp_path / "o", "--size", 32]
    prep(*argv)
    stamp = json.loads((tmp_path / "o" / "prepare.json").read_text())
    old = {k: v for k, v in stamp.items() if k in ("labels_sha256", "images_sha256", "size", "seed", "aspect", "cache")}
    (tmp_path / "o" / "prepare.json").write_text(json.dumps(old))  # what prepare_data.py wrote before --classes
    assert model.classes_of(tmp_path / "o") == model.CLASSES
    capsys.readouterr()
    prep(*argv)  # the same command again: recognised, not refused
    assert "already prepared from the same inputs and settings" in capsys.readouterr().out
    assert train.read_split(str(tmp_path / "o"), "train", model.classes_of(tmp_path / "o"))["class_id"].max() <= 5
    with pytest.raises(SystemExit, match=r"train.csv: row 2: class_id 2 'Cardiomegaly' is not a class of .*\(Normal, Effusion\)"):
        train.read_split(str(tmp_path / "o"), "train", ["Normal", "Effusion"])  # names and ids must agree
