"""instruments/export.py (unet/, scheduler/, README.md): loads with diffusers alone, and the card's own sampling code,
cut out of the card and run, gives model.sample's images; the command exports a run's EMA weights. A tiny UNet at 32 px
and a few steps keep it fast."""
import json
import os
import re

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

import export
import model


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return model.build_unet(32, "tiny").eval()


def card_code(folder):
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(folder, "README.md")).read(), re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_export_is_self_contained_and_replaces_only_itself(unet, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"training state")
    export.export_pretrained(unet, str(run))
    (run / "unet" / "stale.bin").write_bytes(b"from an earlier export")
    export.export_pretrained(unet, str(run))  # a second export replaces the first whole, and nothing else
    assert sorted(os.listdir(run)) == ["README.md", "ckpt.pt", "scheduler", "unet"]  # no export.tmp left behind
    assert (run / "ckpt.pt").read_bytes() == b"training state"
    assert sorted(os.listdir(run / "unet")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert os.listdir(run / "scheduler") == ["scheduler_config.json"]

    # the loading part: diffusers and torch only, nothing of this project
    import diffusers
    config = json.loads((run / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, config["_class_name"]).from_pretrained(run, subfolder="scheduler")
    loaded = diffusers.UNet2DModel.from_pretrained(run, subfolder="unet").eval()
    ddpm = diffusers.DDPMScheduler.from_config(scheduler.config)  # the training schedule travels with any sampler
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([10, 900]), torch.tensor([5, 6])

    assert torch.equal(loaded(x, t, class_labels=y).sample, unet(x, t, class_labels=y).sample)
    assert torch.equal(ddpm.alphas_cumprod, model.make_schedule().alphas_cumprod)
    assert "_use_default_values" not in config  # every value pinned, none re-read from the installed diffusers
    assert type(scheduler) is type(model.make_sampler(export.CARD_SAMPLER, 1)[0])


def test_the_card_states_classes_null_label_pixels_and_the_warning(unet, tmp_path):
    export.export_pretrained(unet, str(tmp_path))
    card = (tmp_path / "README.md").read_text()
    for i, name in enumerate(model.CLASSES):
        assert f"| {i} | {name} |" in card
    assert f"| {len(model.CLASSES)} | null label" in card
    assert "[-1, 1]" in card and "(x + 1) * 127.5" in card and "32x32" in card
    assert "Synthetic images, not patient images. Not for diagnosis" in card
    assert f"w = {model.DEFAULT_GUIDANCE}" in card and f"{model.DEFAULT_STEPS[export.CARD_SAMPLER]} steps" in card


@pytest.mark.parametrize("schedule", [{}, {"prediction": "v_prediction", "shift": 2.0}])
@pytest.mark.parametrize("sampler", [name for name in model.SAMPLERS if name != "ddim-2m"])  # diffusers ones
def test_the_cards_sampling_code_gives_model_samples_images(sampler, schedule, unet, tmp_path, monkeypatch):
    """Whatever diffusers sampler the card uses, the card's code (exec'd as written, from the export folder) and
    model.sample with the same sampler, steps, guidance and noise give the same image: for an eps model on the
    linear schedule and for a v model on a shifted one (the card hands diffusers v, model.sample converts it)."""
    monkeypatch.setattr(export, "CARD_SAMPLER", sampler)
    monkeypatch.setitem(model.DEFAULT_STEPS, sampler, 6)  # ddpm's 1000 steps would take a while
    schedule = model.make_schedule(**schedule)
    export.export_pretrained(unet, str(tmp_path), schedule)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(card_code(tmp_path), ns)  # the card's code imports torch, diffusers and PIL, nothing of this project
    y, w, seed = ns["y"], ns["w"], ns["seed"]
    assert w == model.DEFAULT_GUIDANCE and len(ns["scheduler"].timesteps) == 6

    ref = model.sample(unet, torch.tensor([y]), sampler, 6, w, [torch.Generator().manual_seed(seed)], schedule)  # (1, 1, H, W)
    assert torch.allclose(ns["x"].clamp(-1, 1), ref, atol=1e-5, rtol=0)
    png = Image.open(tmp_path / f"synthetic_class{y}_seed{seed}.png")
    assert png.mode == "L" and png.text["synthetic"] == "1"
    ref_gray = ((ref[0, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.abs(np.asarray(png, dtype=int) - ref_gray).max() <= 1  # +-1 gray level at most: float rounding
    unguided = model.sample(unet, torch.tensor([y]), sampler, 6, 1.0, [torch.Generator().manual_seed(seed)], schedule)
    assert (ns["x"].clamp(-1, 1) - unguided).abs().max() > 1e-3  # so the comparison above could fail


def test_the_command_exports_a_runs_ema_weights_and_never_overwrites_silently(tmp_path, capsys):
    from test_train import make_data, run, sd_equal
    out = tmp_path / "run"
    run(make_data(tmp_path / "d"), out, "--max-steps", "2", "--batch-size", "4", "--snapshot-every", "1")
    ckpt = model.load_checkpoint(str(out))
    assert not (out / "unet").exists()  # training writes checkpoints; the export is its own step
    export.main(["--ckpt", str(out)])
    assert sd_equal(UNet2DModel.from_pretrained(out / "unet").state_dict(), ckpt["ema"])  # the EMA weights
    assert "| 5 | Pneumothorax |" in (out / "README.md").read_text()  # the run's classes
    with pytest.raises(SystemExit, match=f"--out {out} already holds unet: pass --overwrite"):
        export.main(["--ckpt", str(out)])
    snapshot = out / "snapshots" / "ema_step000001.pt"
    export.main(["--ckpt", str(snapshot), "--out", str(out), "--overwrite"])  # any checkpoint, a snapshot too
    first = model.load_checkpoint(str(snapshot))["ema"]
    assert sd_equal(UNet2DModel.from_pretrained(out / "unet").state_dict(), first) and not sd_equal(first, ckpt["ema"])
    with pytest.raises(SystemExit, match="export.py: error: --ckpt .*nothing.pt: no such checkpoint"):
        export.main(["--ckpt", str(tmp_path / "nothing.pt")])
    broken = {**ckpt, "ema": {k: v for k, v in ckpt["ema"].items() if k != "conv_in.weight"}}  # weights cut short
    model.save_checkpoint(str(tmp_path / "broken.pt"), broken)
    with pytest.raises(SystemExit, match="broken.pt: cannot build the UNet from it \\(RuntimeError"):
        export.main(["--ckpt", str(tmp_path / "broken.pt"), "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()  # nothing written
