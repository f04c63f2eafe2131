"""--labels multi through the pipeline: every film of an NIH label file with a 0/1 column per finding, a patient split
that balances every finding, the UNet conditioned on the summed finding vectors (a null label apart from No Finding),
sample.py --findings / --match-train, and the export. Tiny fabricated films at 32 px keep it fast."""
import json
import os
import re
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import export
import model
import prepare_data
import sample
import train

MULTI = prepare_data.MULTI
SETS = ["No Finding", "Effusion", "Atelectasis|Effusion", "Cardiomegaly", "Effusion|Pneumothorax", "Pneumonia"]


def nih_multi(root, patients=24, films=3):
    """An NIH-layout label file whose films carry label sets (SETS, a patient's films share one), and tiny PNGs"""
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID"]
    for p in range(patients):
        for f in range(films):
            name = f"{p:08d}_{f:03d}.png"
            film = 10 * (p % 20) + f + np.random.default_rng(p * 10 + f).integers(0, 40, (32, 32))
            Image.fromarray(film.astype(np.uint8)).save(os.path.join(img_dir, name))
            lines.append(f"{name},{SETS[p % len(SETS)]},{f},{p}")
    csv = os.path.join(root, "Data_Entry_2017.csv")
    with open(csv, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return csv, img_dir


def prepare(csv, images, out, *flags):
    return prepare_data.main(["--csv", csv, "--images", images, "--out", str(out), "--size", "32", "--workers", "1",
                              *flags])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nih")
    csv, images = nih_multi(str(root))
    prepare(csv, images, root / "multi", "--labels", "multi")
    return str(root / "multi")


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "multi"
    train.main(["--data-dir", data, "--out-dir", str(out), "--preset", "tiny", "--num-workers", "0", "--eval-every",
                "0", "--sample-every", "0", "--log-every", "0", "--device", "cpu", "--batch-size", "8",
                "--max-steps", "4"])
    return str(out)


def test_every_film_kept_with_a_column_per_finding_and_no_patient_in_two_splits(data):
    meta = pd.read_parquet(os.path.join(data, "metadata.parquet"))
    assert len(meta) == 24 * 3  # every film: none dropped for carrying two findings
    assert json.load(open(os.path.join(data, "prepare.json")))["labels"] == "multi"
    assert model.classes_of(data) == MULTI and model.labels_of(data) == "multi"
    for label, row in zip(meta["label"], meta[MULTI].to_numpy()):  # the columns are the label set, in MULTI order
        assert label == ("|".join(np.array(MULTI)[row == 1]) or "No Finding")
    assert set(meta["label"]) == set(SETS)
    assert meta.groupby("patient_id")["split"].nunique().max() == 1
    train_csv = pd.read_csv(os.path.join(data, "train.csv"))
    assert set(MULTI) <= set(train_csv.columns) and "class_id" not in train_csv.columns
    assert len(train_csv) + len(pd.read_csv(os.path.join(data, "val.csv"))) + len(
        pd.read_csv(os.path.join(data, "test.csv"))) == len(meta)


def test_the_split_holds_each_common_finding_within_a_point_of_80_10_10():
    """NIH-like label sets (correlated findings, patients with 1-40 films): every finding with >= 1,000 films within
    one percentage point of its 80/10/10 share, No Finding too, and no patient in two splits"""
    rng = np.random.default_rng(0)
    p = np.array([.10, .025, .04, .02, .12, .02, .015, .002, .18, .05, .055, .03, .013, .047])  # NIH's shares
    films = np.minimum(1 + rng.geometric(0.3, 9000), 40)  # per patient
    patient = np.repeat(np.arange(len(films)), films)
    sick = rng.random(len(films)) < 0.5  # half the patients never show a finding
    Y = (rng.random((len(patient), 14)) < 2 * p) & sick[patient, None]
    Y[:, 4] |= Y[:, 0] & (rng.random(len(patient)) < 0.4)  # effusion with atelectasis, as in NIH
    Y = np.column_stack([Y, ~Y.any(1)]).astype(float)  # + No Finding
    split = prepare_data.split_patients(patient, Y, seed=0)
    assert pd.Series(split).groupby(patient).nunique().max() == 1
    for c in np.flatnonzero(Y.sum(0) >= 1000):
        share = pd.Series(split[Y[:, c] == 1]).value_counts(normalize=True)[prepare_data.SPLITS] * 100
        assert (share - [80, 10, 10]).abs().max() <= 1.0, (c, share)


@pytest.mark.parametrize("labels, flags, says", [
    ("Effusion|No Finding", [], "not both, not none"),
    ("Effusion|Lung Opacity", [], "unknown finding 'Lung Opacity'"),
    ("Effusion", ["--classes", "No Finding,Effusion"], "--labels multi takes NIH's 14 findings"),
])
def test_bad_label_files_and_flags_are_one_line_errors(tmp_path, capsys, labels, flags, says):
    csv, images = nih_multi(str(tmp_path), patients=6)
    text = open(csv).read().replace("00000000_000.png,No Finding", f'00000000_000.png,"{labels}"')
    open(csv, "w").write(text)
    with pytest.raises(SystemExit) as e:
        prepare(csv, images, tmp_path / "out", "--labels", "multi", *flags)
    assert says in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out" / "metadata.parquet")


def test_a_plain_csv_or_folders_cannot_be_multi_label(tmp_path):
    plain = tmp_path / "labels.csv"
    plain.write_text("image,label\na.png,Effusion\n")
    (tmp_path / "img").mkdir()
    with pytest.raises(SystemExit, match="--labels multi reads an NIH-layout label file"):
        prepare(str(plain), str(tmp_path / "img"), tmp_path / "out", "--labels", "multi")


def test_null_label_is_not_no_finding_and_dropout_drops_whole_label_sets():
    torch.manual_seed(0)
    unet = model.build_unet(32, "tiny", num_classes=14, multi_label=True)
    y = torch.zeros(1000, 15)
    y[:, [0, 4]] = 1  # Atelectasis + Effusion
    null = model.null_labels(unet, y[:1])
    assert null.tolist() == [[0.0] * 14 + [1.0]]  # its own column; No Finding is the zero vector
    dropped = train.drop_labels(y, 0.3, torch.Generator().manual_seed(0), null)
    kept = (dropped == y).all(1)
    assert ((dropped == null).all(1) | kept).all()  # a set is dropped whole or kept whole
    assert 0.25 < (~kept).float().mean() < 0.35
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([500] * 3)
    labels = torch.stack([torch.zeros(15), null[0], y[0]])  # No Finding, null, a pair
    out = unet(x, t, class_labels=labels).sample
    assert (out[0] - out[1]).abs().max() > 1e-4 and (out[0] - out[2]).abs().max() > 1e-4
    E = unet.class_embedding.weight  # (15, D): the pair's embedding is the sum of its two vectors
    assert torch.allclose(unet.class_embedding(y[:1]), E[0] + E[4])


def test_a_resumed_multi_label_run_equals_an_uninterrupted_one(data, tmp_path, monkeypatch):
    """--resume restores a label-set run as it does a six-class one: bitwise the same weights and EMA"""
    flags = ["--data-dir", data, "--preset", "tiny", "--num-workers", "0", "--eval-every", "0", "--sample-every", "0",
             "--log-every", "0", "--device", "cpu", "--batch-size", "4", "--cond-drop", "0.5", "--ema-decay", "0.5",
             "--lr", "1e-3", "--warmup-steps", "1", "--max-steps", "4"]
    train.main([*flags, "--out-dir", str(tmp_path / "straight")])
    real_ema_update = train.ema_update

    def sigterm_after_step_2(ema, net, decay, calls=[]):
        real_ema_update(ema, net, decay)
        calls.append(decay)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)  # finish the step, save, exit
    monkeypatch.setattr(train, "ema_update", sigterm_after_step_2)
    train.main([*flags, "--out-dir", str(tmp_path / "stopped")])
    monkeypatch.setattr(train, "ema_update", real_ema_update)
    assert model.load_checkpoint(str(tmp_path / "stopped"))["step"] == 2
    train.main(["--resume", "--out-dir", str(tmp_path / "stopped")])
    a, b = (model.load_checkpoint(str(tmp_path / d)) for d in ("straight", "stopped"))
    assert a["labels"] == b["labels"] == "multi" and b["step"] == 4
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def test_train_records_the_label_sets_and_sample_draws_them(run, data, tmp_path):
    ckpt = model.load_checkpoint(run)
    train_csv = pd.read_csv(os.path.join(data, "train.csv"))
    assert ckpt["labels"] == "multi" and ckpt["classes"] == MULTI
    assert ckpt["label_sets"] == train_csv["label"].value_counts().to_dict()

    m = sample.main(["--ckpt", run, "--out", str(tmp_path / "pair"), "--steps", "2", "--n", "2",
                     "--findings", "effusion+ATELECTASIS", "--findings", "none"])
    assert m["label"].tolist() == ["Atelectasis|Effusion"] * 2 + ["No Finding"] * 2
    assert m[MULTI].sum(axis=1).tolist() == [2, 2, 0, 0] and m[["Atelectasis", "Effusion"]].iloc[:2].eq(1).all().all()
    both = pd.concat([train_csv, m])  # ready for augmentation: the same finding columns
    assert both[MULTI].notna().all().all() and both["synthetic"].tolist()[-4:] == [1] * 4
    png = Image.open(m["path"].iloc[0])
    assert png.text["synthetic"] == "1" and png.text["findings"] == "Atelectasis|Effusion"

    n = 50
    m = sample.main(["--ckpt", run, "--out", str(tmp_path / "match"), "--steps", "1", "--match-train", str(n),
                     "--batch-size", "50"])
    assert len(m) == n and os.listdir(tmp_path / "match").count("grid_match_train.png") == 1
    freq = pd.Series(ckpt["label_sets"]) / sum(ckpt["label_sets"].values())
    drawn = m["label"].value_counts().reindex(freq.index, fill_value=0)
    assert ((drawn - n * freq).abs() < 1).all()  # each set within one image of its share
    again = sample.main(["--ckpt", run, "--out", str(tmp_path / "pair2"), "--steps", "2", "--n", "2",
                         "--findings", "Atelectasis+Effusion"])  # the same set, the same images as above
    assert np.array_equal(np.asarray(Image.open(again["path"].iloc[1])),
                          np.asarray(Image.open(tmp_path / "pair" / "atelectasis_effusion_s0_00001.png")))


@pytest.mark.parametrize("argv, says", [
    (["--class", "Effusion"], "is a multi-label checkpoint: ask with --findings"),
    (["--findings", "Effusion+Lung Opacity"], "'Lung Opacity' is not a finding of"),
    (["--findings", "Effusion", "--match-train", "5"], "ask for one of"),
])
def test_bad_label_requests_are_one_line_errors(run, tmp_path, argv, says):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", run, "--out", str(tmp_path / "s"), *argv])
    assert says in str(e.value) and "\n" not in str(e.value)
    if "Lung Opacity" in argv[-1]:
        assert all(f in str(e.value) for f in MULTI)  # it lists the findings
    assert not os.path.exists(tmp_path / "s" / "manifest.csv")


def test_a_single_label_checkpoint_refuses_label_sets_and_a_multi_label_run_single_label_data(run, tmp_path):
    torch.manual_seed(0)
    unet = model.build_unet(32, "tiny")
    single = tmp_path / "single.pt"
    model.save_checkpoint(single, dict(model=unet.state_dict(), ema=unet.state_dict(), step=0, image_size=32,
                                       unet_config=model.unet_config(unet), classes=model.CLASSES, args={}))
    with pytest.raises(SystemExit, match="is a single-label checkpoint: ask with --class"):
        sample.main(["--ckpt", str(single), "--out", str(tmp_path / "s"), "--findings", "Effusion"])
    d = tmp_path / "six"
    d.mkdir()
    with pytest.raises(SystemExit, match="multi-label"):  # --resume of the multi-label run on six-class data
        train.main(["--data-dir", str(make_six_class(d)), "--out-dir", run, "--resume", "--device", "cpu"])


def make_six_class(d):
    """A six-class prepared folder at 32 px, as prepare_data.py writes it: the classes as CLASSES"""
    rows = []
    for c in range(6):
        for i in range(4):
            path = os.path.join(d, f"{c}_{i}.png")
            Image.fromarray(np.full((32, 32), 40 * c, np.uint8)).save(path)
            rows.append(dict(image_index=f"{c}_{i}.png", patient_id=len(rows), label=model.CLASSES[c], class_id=c,
                             path=path, cache_row=-1))
    for split in ("train", "val"):
        pd.DataFrame(rows).to_csv(os.path.join(d, f"{split}.csv"), index=False)
    return d


def test_the_export_loads_in_plain_diffusers_and_its_card_draws_a_label_set(tmp_path, monkeypatch):
    """The card's own code (exec'd as written) sums the finding vectors and gives model.sample's image"""
    torch.manual_seed(0)
    unet = model.build_unet(32, "tiny", num_classes=14, multi_label=True).eval()
    monkeypatch.setitem(model.DEFAULT_STEPS, export.CARD_SAMPLER, 4)
    export.export_pretrained(unet, str(tmp_path), classes=MULTI, multi_label=True)
    assert isinstance(unet.class_embedding, model.MultiHotEmbedding)  # the export changed a copy, not the model
    card = open(tmp_path / "README.md").read()
    assert "| 14 | null label" in card and "| 4 | Effusion |" in card
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(re.findall(r"```python\n(.*?)```", card, re.S)[0], ns)  # diffusers, torch and PIL only
    y = torch.zeros(1, 15)
    y[0, ns["y"]] = 1
    assert sorted(ns["y"]) == [MULTI.index("Atelectasis"), MULTI.index("Effusion")]
    ref = model.sample(unet, y, export.CARD_SAMPLER, 4, ns["w"], [torch.Generator().manual_seed(ns["seed"])])
    assert torch.allclose(ns["x"].clamp(-1, 1), ref, atol=1e-5, rtol=0)
    assert Image.open(tmp_path / "synthetic_findings_seed0.png").text["synthetic"] == "1"


@pytest.mark.slow
def test_curve_scores_a_multi_label_run_per_finding(data, tmp_path):
    import curve
    run = tmp_path / "run"
    train.main(["--data-dir", data, "--out-dir", str(run), "--preset", "tiny", "--num-workers", "0", "--eval-every",
                "0", "--sample-every", "0", "--log-every", "0", "--device", "cpu", "--max-steps", "2",
                "--snapshot-every", "2"])
    curve.main(["--run", str(run), "--data-dir", data, "--n", "2", "--steps", "2",
                "--evaluate-args", "--width 8 --epochs 1 --epoch-steps 5 --repeats 5 --device cpu"])
    rows = pd.read_csv(run / "curve.csv")
    assert rows["step"].tolist() == [2]  # --match-train films, scored per finding and No Finding
    assert {f"fidelity {f}" for f in ("Atelectasis", "Effusion", "Pneumonia", "No Finding")} <= set(rows.columns)
    assert len(pd.read_csv(run / "curve" / "samples" / "manifest.csv")) == 2 * (len(MULTI) + 1)
