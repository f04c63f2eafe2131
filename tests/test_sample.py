"""sample.py: PNGs, synthetic metadata, manifest, reproducibility, samplers, UNet calls, bad input, safe loading.
A tiny random-init UNet at 32 px and a few steps keep the whole file fast on a shared 2-core CPU."""
import hashlib
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import model
import sample

CONTRACT = ["image_index", "patient_id", "label", "class_id", "path", "synthetic",
            "sampler", "steps", "guidance", "eta", "seed", "checkpoint_sha256"]



@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    unet = model.build_unet(32, "tiny")
    path = tmp_path_factory.mktemp("run") / "ckpt.pt"
    model.save_checkpoint(path, dict(model=unet.state_dict(), ema=unet.state_dict(), optimizer={}, scaler=None,
                                     step=0, unet_config=model.unet_config(unet), classes=model.CLASSES,
                                     image_size=32, args={}, rng={}))
    return path


def run(ckpt, out, *argv):
    return sample.main(["--ckpt", str(ckpt), "--out", str(out), "--steps", "3", *argv])


def pngs(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".png") and "grid" not in f)


def test_pngs_metadata_and_manifest(ckpt, tmp_path):
    out = tmp_path / "s"
    run(ckpt.parent, out, "--class", "effusion", "--class", "0", "--n", "3", "--seed", "7")  # a run folder works
    names = [f"{c}_s7_{i:05d}.png" for c in ("effusion", "no_finding") for i in range(3)]
    assert pngs(out) == sorted(names)
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    pixels = set()
    for name in names:
        im = Image.open(out / name)
        assert (im.format, im.mode, im.size) == ("PNG", "L", (32, 32))
        assert im.text["synthetic"] == "1" and "SYNTHETIC" in im.text["Description"]
        assert "not a patient image" in im.text["Description"]
        assert im.text["class"] == ("Effusion" if name.startswith("effusion") else "No Finding")
        assert (im.text["seed"], im.text["index"], im.text["sampler"]) == ("7", str(int(name[-9:-4])), model.DEFAULT_SAMPLER)
        assert (im.text["steps"], float(im.text["guidance"]), im.text["checkpoint_sha256"]) == ("3", model.DEFAULT_GUIDANCE, sha)
        pixels.add(im.tobytes())
    assert len(pixels) == 6  # six different images, not one repeated
    for grid in ("grid_effusion.png", "grid_no_finding.png"):
        g = Image.open(out / grid)
        assert g.mode == "L" and g.text["synthetic"] == "1" and min(g.size) > 32

    m = pd.read_csv(out / "manifest.csv")
    assert list(m.columns) == CONTRACT
    assert sorted(m["image_index"]) == sorted(names) and not m["path"].str.contains("grid").any()
    assert all(os.path.isabs(p) and os.path.isfile(p) and os.path.basename(p) == n
               for p, n in zip(m["path"], m["image_index"]))
    assert m["patient_id"].isna().all() and (m["synthetic"] == 1).all()
    assert (m["label"].map(model.CLASSES.index) == m["class_id"]).all()
    assert set(m["sampler"]) == {model.DEFAULT_SAMPLER} and set(m["steps"]) == {3} and set(m["seed"]) == {7}
    assert set(m["guidance"]) == {model.DEFAULT_GUIDANCE} and set(m["checkpoint_sha256"]) == {sha} and set(m["eta"]) == {0}
    train = pd.DataFrame(dict(image_index=["00000001_000.png"], patient_id=[1], label=["Effusion"], class_id=[3],
                              path=["/data/images/00000001_000.png"], cache_row=[0]))
    aug = pd.concat([train, m], ignore_index=True)
    assert len(aug) == 7 and aug["label"].isin(model.CLASSES).all() and aug["path"].notna().all()
    assert aug["synthetic"].fillna(0).tolist() == [0] + [1] * 6


def gray(path):
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.parametrize("sampler", ["ddim-2m", "ddpm", "ddim-2m --eta 1"])  # ddpm and eta draw fresh noise too
def test_images_reproducible_and_independent_of_batch(ckpt, tmp_path, sampler):
    sampler, *eta = sampler.split(" ", 1)
    eta = eta[0].split() if eta else []
    alone = run(ckpt, tmp_path / "a", "--class", "Effusion", "--n", "4", "--batch-size", "1", "--sampler", sampler, *eta)
    again = run(ckpt, tmp_path / "b", "--class", "Effusion", "--n", "4", "--batch-size", "1", "--sampler", sampler, *eta)
    mixed = run(ckpt, tmp_path / "c", "--class", "all", "--n", "4", "--batch-size", "5", "--sampler", sampler, *eta)
    assert set(mixed["eta"]) == {float(eta[1]) if eta else 0.0}  # the manifest says how they were drawn
    assert list(alone["image_index"]) == list(again["image_index"])
    assert set(alone["image_index"]) < set(mixed["image_index"])
    for name in alone["image_index"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name  # bitwise
        # another batch size and other classes in the batch: the same image. CPU kernels pick their algorithm
        # by batch shape, so a float can move ~1e-4 and, rarely, a pixel rounds to the next gray level
        diff = np.abs(gray(tmp_path / "a" / name) - gray(tmp_path / "c" / name))
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.005, name
    assert len({(tmp_path / "a" / n).read_bytes() for n in alone["image_index"]}) == 4
    other_seed = run(ckpt, tmp_path / "d", "--class", "Effusion", "--n", "1", "--seed", "1", "--sampler", sampler, *eta)
    assert np.abs(gray(other_seed["path"][0]) - gray(tmp_path / "a" / "effusion_s0_00000.png")).mean() > 5


@pytest.mark.parametrize("sampler", list(model.SAMPLERS))
def test_every_sampler_runs(ckpt, tmp_path, sampler):
    steps = ["--steps", "20"] if sampler == "ddpm" else []  # the others run at their default steps
    m = sample.main(["--ckpt", str(ckpt), "--out", str(tmp_path), "--class", "Pneumothorax", "--n", "2",
                     "--sampler", sampler.upper(), *steps])
    assert list(m["steps"]) == [20 if sampler == "ddpm" else model.DEFAULT_STEPS[sampler]] * 2
    assert set(m["sampler"]) == {sampler} and len(pngs(tmp_path)) == 2
    im = Image.open(m["path"][0])
    assert im.size == (32, 32) and im.getextrema()[0] < im.getextrema()[1]  # not a blank image


@pytest.mark.parametrize("rule, flags, used", [("bf16", [], "bf16"), ("bf16", ["--no-amp"], "fp32"), ("off", ["--amp"], "bf16")])
def test_autocast_follows_the_training_rule(ckpt, tmp_path, monkeypatch, rule, flags, used):
    """By default sample.py autocasts as train.py --amp auto does: model.auto_amp (bf16 from compute capability 8.0,
    fp16 below, fp32 on a CPU; tests/test_train.py mocks the capabilities). --no-amp: fp32; --amp on a CPU: bf16."""
    dtypes, build = [], model.unet_from_checkpoint

    def spy(*args, **kwargs):  # records the dtype the first conv computes in
        unet = build(*args, **kwargs)
        unet.conv_in.register_forward_hook(lambda module, inputs, out: dtypes.append(out.dtype))
        return unet
    monkeypatch.setattr(model, "unet_from_checkpoint", spy)
    monkeypatch.setattr(model, "auto_amp", lambda device: rule)  # what the rule says for the device at hand
    m = run(ckpt, tmp_path, "--class", "3", "--n", "1", *flags)
    assert set(dtypes) == {torch.bfloat16 if used == "bf16" else torch.float32}
    assert Image.open(m["path"][0]).text["amp"] == used


@pytest.mark.parametrize("sampler", ["ddim-2m", "ddpm"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_unet_calls_per_image(ckpt, tmp_path, monkeypatch, sampler, guidance):
    batches = []
    build = model.unet_from_checkpoint

    def counting(*args, **kwargs):
        unet = build(*args, **kwargs)
        unet.register_forward_pre_hook(lambda module, inputs: batches.append(inputs[0].shape[0]))
        return unet

    monkeypatch.setattr(model, "unet_from_checkpoint", counting)
    sample.main(["--ckpt", str(ckpt), "--out", str(tmp_path), "--class", "3", "--n", "3", "--batch-size", "3",
                 "--sampler", sampler, "--steps", "5", "--guidance", str(guidance)])
    # guidance 1: one conditional forward per step; guidance > 1: cond and null batched into one forward of 2B
    assert batches == [3 if guidance == 1.0 else 6] * 5


def test_parse_classes():
    names = model.CLASSES
    assert sample.parse_classes(["no_finding", "PNEUMOTHORAX", "3", "effusion", "No Finding"], names) == [0, 5, 3]
    assert sample.parse_classes(["ALL"], names) == list(range(len(model.CLASSES)))
    mine = ["Normal", "Bacterial pneumonia", "Viral pneumonia"]  # a checkpoint's own classes, not NIH's
    assert sample.parse_classes(["viral_pneumonia", "0"], mine) == [2, 0]
    with pytest.raises(SystemExit, match="'Effusion': not a class of run/x; choose from Normal, Bacterial pneumonia, "
                                         "Viral pneumonia, a class_id 0-2, or all"):
        sample.parse_classes(["Effusion"], mine, "run/x")


@pytest.mark.parametrize("argv, says", [
    (["--class", "Efusion"], "--class 'Efusion': not a class of"),
    (["--class", "9"], "--class '9': not a class of"),
    (["--class", "3", "--n", "0"], "--n 0"),
    (["--class", "3", "--sampler", "euler"], "unknown sampler 'euler'"),
    (["--class", "3", "--steps", "0"], "--steps 0"),
    (["--class", "3", "--steps", "5000"], "--steps 5000"),
    (["--class", "3", "--guidance", "0.5"], "--guidance 0.5"),
    (["--class", "3", "--batch-size", "0"], "--batch-size 0"),
    (["--class", "3", "--eta", "1.5"], "--eta 1.5: ddim-2m takes an eta from 0 to 1"),
    (["--class", "3", "--sampler", "ddim", "--eta", "0.5"], "--eta 0.5: ddim-2m takes"),
])
def test_bad_flags_fail_before_any_work(ckpt, tmp_path, argv, says):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "s"), *argv])
    msg = str(e.value)
    assert msg.startswith("sample.py: error: ") and says in msg and "\n" not in msg
    assert not (tmp_path / "s").exists()


def test_bad_checkpoint_or_out(ckpt, tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "a_file").write_text("x")
    c = model.load_checkpoint(str(ckpt))
    cut = lambda sd: {k: v for k, v in sd.items() if k != "conv_in.weight"}  # weights cut short
    model.save_checkpoint(str(tmp_path / "broken.pt"), {**c, "ema": cut(c["ema"]), "model": cut(c["model"])})
    for argv, says in [(["--ckpt", str(tmp_path / "nope.pt")], "no such checkpoint"),
                       (["--ckpt", str(tmp_path / "foreign.pt")], "not a checkpoint of this project"),
                       (["--ckpt", str(tmp_path / "broken.pt")], "broken.pt: cannot build the UNet from it (RuntimeError"),
                       (["--ckpt", str(ckpt), "--out", str(tmp_path / "a_file" / "s")], "not a writable folder")]:
        with pytest.raises(SystemExit) as e:
            sample.main(["--class", "3", "--out", str(tmp_path / "s"), *argv])
        assert str(e.value).startswith("sample.py: error: ") and says in str(e.value), str(e.value)


def test_refuses_to_overwrite_samples(ckpt, tmp_path):
    out = tmp_path / "s"
    run(ckpt, out, "--class", "Effusion", "--n", "2")
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    with pytest.raises(SystemExit, match="already holds samples"):
        run(ckpt, out, "--class", "Effusion", "--n", "2", "--seed", "1")
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # nothing touched
    stray = tmp_path / "stray"
    stray.mkdir()
    Image.new("L", (8, 8)).save(stray / "mine.png")  # any PNG counts, not only a manifest
    with pytest.raises(SystemExit, match="already holds samples"):
        run(ckpt, stray, "--class", "Effusion", "--n", "1")
    m = run(ckpt, out, "--class", "Effusion", "--n", "2", "--seed", "1", "--overwrite")
    assert set(pd.read_csv(out / "manifest.csv")["image_index"]) == set(m["image_index"]) == \
        {"effusion_s1_00000.png", "effusion_s1_00001.png"}


class Payload:  # unpickling this runs a shell command: what a malicious "checkpoint" would do
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_with_code_is_refused_unrun(tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"unet_config": Payload(marker), "classes": model.CLASSES, "image_size": 32}, evil)
    with pytest.raises(SystemExit, match="refused"):
        sample.main(["--ckpt", str(evil), "--class", "3", "--out", str(tmp_path / "s")])
    assert not marker.exists() and not (tmp_path / "s").exists()
    torch.load(evil, weights_only=False)  # the file really is armed: a plain torch.load runs the command
    assert marker.exists()
