"""train.py on tiny fabricated prepared-data folders (the data contract), CPU, preset tiny, 32 px."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
import weakref

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import model
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--image-size", "32", "--num-workers", "0", "--eval-every", "0", "--sample-every", "0",
        "--log-every", "0", "--device", "cpu"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # subprocesses: one thread each on the 2 shared cores



def make_data(d, counts=(6, 0, 0, 0, 6, 0), size=32, cache=True, png_size=None):
    """A prepared-data folder: train/val/test.csv, PNGs, and cache.npy whose rows are shuffled vs the csv order."""
    os.makedirs(d, exist_ok=True)
    rows, images = [], []
    for c, n in enumerate(counts):
        for i in range(n + 4 if n else 0):  # n train, 2 val, 2 test images per present class
            yy, xx = np.mgrid[:size, :size]
            img = (40 + 30 * c + 20 * np.sin(xx / 3 + yy / (c + 2) + i)).clip(0, 255).astype(np.uint8)
            path = os.path.join(d, f"{c}_{i}.png")
            Image.fromarray(img).resize((png_size or size,) * 2).save(path)
            split = "train" if i < n else "val" if i < n + 2 else "test"
            rows.append(dict(image_index=f"{c}_{i}.png", patient_id=len(rows), label=model.CLASSES[c], class_id=c,
                             path=path, split=split))
            images.append(img)
    df = pd.DataFrame(rows)
    order = np.random.default_rng(0).permutation(len(df))
    df["cache_row"] = order if cache else -1
    if cache:
        cache_arr = np.zeros((len(df), size, size), np.uint8)
        cache_arr[order] = np.stack(images)
        np.save(os.path.join(d, "cache.npy"), cache_arr)
    for split in ("train", "val", "test"):
        df[df.split == split].drop(columns="split").to_csv(os.path.join(d, f"{split}.csv"), index=False)
    return str(d)


def run(data, out, *flags):
    return train.main(["--data-dir", data, "--out-dir", str(out), *TINY, *flags])


def sd_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stop_after(steps, monkeypatch, data, out, *flags):
    """A run sent SIGTERM twice (SLURM's and torchrun's) during step `steps`: it finishes the step and saves."""
    real_ema_update, calls = train.ema_update, []

    def ema_update_then_sigterm(ema, net, decay):
        real_ema_update(ema, net, decay)
        calls.append(decay)
        if len(calls) == steps:
            signal.raise_signal(signal.SIGTERM)  # raise_signal runs the handler before it returns: two calls, not one
            signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(train, "ema_update", ema_update_then_sigterm)
    run(data, out, *flags)
    monkeypatch.setattr(train, "ema_update", real_ema_update)
    assert model.load_checkpoint(str(out))["step"] == steps

# -----------------------------------------------------------------------------
# the small functions: LR, EMA, label dropout, data order, batches


def test_lr_warmup_then_cosine_to_zero():
    assert train.lr_at(0, 1e-4, 10, 110) == pytest.approx(1e-5)
    assert train.lr_at(4, 1e-4, 10, 110) == pytest.approx(5e-5)
    assert train.lr_at(10, 1e-4, 10, 110) == pytest.approx(1e-4)  # peak right after warmup
    assert train.lr_at(60, 1e-4, 10, 110) == pytest.approx(5e-5)  # half-way down the cosine
    assert train.lr_at(85, 1e-4, 10, 110) == pytest.approx(1e-4 * 0.5 * (1 + np.cos(np.pi * 0.75)))
    assert train.lr_at(110, 1e-4, 10, 110) == pytest.approx(0, abs=1e-12)


def test_min_snr_weights_only_the_low_noise_steps_down():
    alpha_bar = model.make_schedule().alphas_cumprod
    snr = alpha_bar / (1 - alpha_bar)
    w = model.loss_weights(alpha_bar, "epsilon", "min-snr", 5.0)
    assert torch.equal(w[snr <= 5], torch.ones(int((snr <= 5).sum())))  # noisy steps: plain eps-MSE
    assert torch.allclose(w[snr > 5], 5 / snr[snr > 5]) and w[0] == pytest.approx(5e-4, rel=1e-3)  # t=0: SNR ~1e4
    assert (w[1:] >= w[:-1]).all()  # less weight the cleaner xt is
    assert torch.equal(model.loss_weights(alpha_bar, "epsilon", "mse", 5.0), torch.ones(1000))  # the original loss


def test_low_noise_weights_lean_to_the_clean_end_and_keep_the_mean():
    """--loss low-noise: the opposite of Min-SNR, more weight where xt is nearly clean (where fine texture is drawn)."""
    alpha_bar = model.make_schedule().alphas_cumprod
    snr = alpha_bar / (1 - alpha_bar)
    for p in ("v_prediction", "epsilon"):
        w = model.loss_weights(alpha_bar, p, "low-noise")
        assert w.mean() == pytest.approx(1.0, rel=1e-5)  # the LR means what it means under plain MSE
        x0_weight = w * (snr + 1 if p == "v_prediction" else snr)  # the weight of the x0 error
        ratio = x0_weight / (snr + 1)  # over plain v-MSE's: sqrt(min(SNR + 1, 100)), up to a constant
        assert torch.allclose(ratio / ratio[-1], (snr + 1).clamp(max=100).sqrt() / (snr[-1] + 1).sqrt(), rtol=1e-4)
    w = model.loss_weights(alpha_bar, "v_prediction", "low-noise", 4.0)
    assert w[0] / w[-1] == pytest.approx(2.0 / (snr[-1] + 1).sqrt().item(), rel=1e-3)  # the cap: SNR + 1 <= 4


def test_eps_and_v_targets_weigh_the_x0_error_alike_under_min_snr():
    """The same prediction error of x0 costs the same under Min-SNR, whether the UNet says eps or v."""
    alpha_bar, g = model.make_schedule(shift=2.0).alphas_cumprod, torch.Generator().manual_seed(0)
    x0, eps, dx0 = (torch.randn(3, 1, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([5, 300, 990])
    a = alpha_bar[t].view(-1, 1, 1, 1)
    xt = model.add_noise(x0, eps, t, alpha_bar)
    assert torch.allclose(model.target(x0, eps, t, alpha_bar, "v_prediction"), a.sqrt() * eps - (1 - a).sqrt() * x0)
    assert torch.allclose(a.sqrt() * xt - (1 - a).sqrt() * model.target(x0, eps, t, alpha_bar, "v_prediction"), x0, atol=1e-5)
    losses = []
    for p in ("epsilon", "v_prediction"):  # a model whose x0 is off by dx0: its eps is off by -sqrt(a / (1 - a)) dx0, its v by ...
        wrong = (xt - a.sqrt() * (x0 + dx0)) / (1 - a).sqrt()  # the eps that goes with x0 + dx0
        pred = model.target(x0 + dx0, wrong, t, alpha_bar, p)
        w = model.loss_weights(alpha_bar, p, "min-snr", 5.0)[t]
        losses.append(w * (pred - model.target(x0, eps, t, alpha_bar, p)).pow(2).mean((1, 2, 3)))
    assert torch.allclose(losses[0], losses[1], rtol=1e-4)
    assert torch.allclose(losses[0], (alpha_bar[t] / (1 - alpha_bar[t])).clamp(max=5) * dx0.pow(2).mean((1, 2, 3)), rtol=1e-4)


def test_ema_update_hand_computed():
    ema, net = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        ema.weight.fill_(1.0), ema.bias.fill_(-2.0), net.weight.fill_(3.0), net.bias.fill_(0.0)
    train.ema_update(ema, net, 0.9)
    assert torch.allclose(ema.weight, torch.full((1, 2), 0.9 * 1 + 0.1 * 3))
    assert torch.allclose(ema.bias, torch.tensor([0.9 * -2 + 0.1 * 0]))
    assert torch.equal(net.weight, torch.full((1, 2), 3.0))  # the model itself is untouched


def test_label_dropout_rate():
    y = torch.zeros(200_000, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    for p in (0.0, 0.1, 0.5, 1.0):
        out = train.drop_labels(y, p, g, len(model.CLASSES))
        assert set(out.unique().tolist()) <= {0, len(model.CLASSES)}
        assert (out == len(model.CLASSES)).float().mean().item() == pytest.approx(p, abs=0.005)


def test_an_unlabelled_film_trains_the_null_label_and_is_drawn_as_a_group_of_its_own(tmp_path):
    data = make_data(tmp_path / "d", counts=(3, 0, 0, 0, 1, 0))
    df = pd.read_csv(f"{data}/train.csv")
    df.loc[len(df)] = {**df.iloc[0].to_dict(), "image_index": "u.png", "label": np.nan, "class_id": -1}  # unlabelled
    df.to_csv(f"{data}/train.csv", index=False)
    y, null = train.read_split(data, "train", model.CLASSES)["class_id"], len(model.CLASSES)
    assert y.tolist() == [0, 0, 0, 4, null]  # the null label: the unconditional model, never a class
    assert train.drop_labels(torch.tensor(y), 0.0, torch.Generator().manual_seed(0), null).tolist() == y.tolist()
    w = train.class_weights(y, "inverse")  # three groups, a third of the draws each
    assert w.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1, 1])


@pytest.mark.parametrize("balance, shares", [("none", [64, 16, 4]), ("sqrt", [8, 4, 2]), ("inverse", [1, 1, 1])])
def test_balanced_sampling_proportions(balance, shares):
    class_id = np.repeat([0, 3, 4], [64, 16, 4])  # No Finding, Effusion, Pneumonia
    w = train.class_weights(class_id, balance)
    stream = train.index_stream(w, balance != "none", seed=0, start=0)
    drawn = class_id[[next(stream) for _ in range(84 * 300)]]
    got = np.array([(drawn == c).mean() for c in (0, 3, 4)])
    assert got == pytest.approx(np.array(shares) / sum(shares), abs=0.015)
    if balance == "none":  # an 'epoch' is a permutation: every image exactly once
        first = train.index_stream(w, False, seed=0, start=0)
        assert sorted(next(first) for _ in range(84)) == list(range(84))


def test_data_order_is_a_function_of_seed_and_position():
    w = train.class_weights(np.repeat([0, 4], [7, 3]), "sqrt")
    full = train.index_stream(w, True, seed=5, start=0)
    full = [next(full) for _ in range(40)]
    resumed = train.index_stream(w, True, seed=5, start=23)  # what --resume at image 23 sees
    assert [next(resumed) for _ in range(17)] == full[23:]
    other = train.index_stream(w, True, seed=6, start=0)
    assert [next(other) for _ in range(40)] != full
    # two ranks split every global batch without overlap
    r0 = train.rank_batches(train.index_stream(w, True, 5, 0), 4, 0, 2)
    r1 = train.rank_batches(train.index_stream(w, True, 5, 0), 4, 1, 2)
    assert next(r0) + next(r1) == full[:8] and next(r0) + next(r1) == full[8:16]


def test_load_batch_reads_cache_rows_and_pngs_alike(tmp_path):
    data = make_data(tmp_path / "d")
    df = pd.read_csv(os.path.join(data, "train.csv"))
    cols = df.cache_row.to_numpy(), df.path.to_numpy(), df.class_id.to_numpy()
    x_cache, y = train.load_batch([3, 0, 7], os.path.join(data, "cache.npy"), *cols, 32)
    x_png, y_png = train.load_batch([3, 0, 7], None, *cols, 32)
    assert x_cache.shape == (3, 1, 32, 32) and x_cache.dtype == torch.uint8
    assert torch.equal(x_cache, x_png) and torch.equal(y, y_png) and y.tolist() == df.class_id[[3, 0, 7]].tolist()

# -----------------------------------------------------------------------------
# whole runs


def test_tiny_model_overfits_and_writes_the_run_folder(tmp_path):
    data, out = make_data(tmp_path / "d"), tmp_path / "run"
    run(data, out, "--max-steps", "30", "--batch-size", "8", "--lr", "2e-3", "--warmup-steps", "3",
        "--log-every", "5", "--eval-every", "15", "--sample-every", "20", "--sample-per-class", "1")
    m = pd.read_csv(out / "metrics.csv")
    assert list(m.columns) == ["step", "time_s", "loss", "lr", "img_per_s", "val_loss"] and m.step.tolist() == [5, 10, 15, 20, 25, 30]
    assert m.loss.iloc[-2:].mean() < 0.55 * m.loss.iloc[0]  # falls well below its start (v's loss starts ~0.3, not 1)
    assert m.lr.tolist() == pytest.approx([train.lr_at(s - 1, 2e-3, 3, 30) for s in m.step], rel=1e-4)
    assert m.val_loss.notna().tolist() == [False, False, True, False, False, True]
    assert sorted(p.name for p in out.glob("samples_step*.png")) == ["samples_step000020.png", "samples_step000030.png"]
    grid = Image.open(out / "samples_step000030.png")  # the last step always gets one
    assert grid.size == (train.LABEL_W + 32, 6 * 32) and grid.text["synthetic"] == "1"
    ckpt = model.load_checkpoint(str(out))  # weights_only=True
    assert {"model", "ema", "optimizer", "scaler", "step", "unet_config", "classes", "image_size", "args",
            "rng"} <= ckpt.keys()
    assert ckpt["step"] == 30 and ckpt["image_size"] == 32 and ckpt["classes"] == model.CLASSES
    assert not any("_orig_mod" in k for k in ckpt["model"])


@pytest.mark.slow
def test_train_and_val_loss_read_on_the_same_footing(tmp_path):
    """The val loss is the training loss (Min-SNR weights, eps or v target) on val images: with the weights frozen
    (--lr 0) and the training images as val, the two agree up to sampling noise (~10% here). A plain eps-MSE on val
    read 1.01 against 0.66 (eps) and 0.014 (v) and looked like overfitting."""
    data = make_data(tmp_path / "d")
    train_df = pd.read_csv(os.path.join(data, "train.csv"))
    pd.concat([train_df] * 22).to_csv(os.path.join(data, "val.csv"), index=False)  # 264 rows: every image at many t
    for prediction in ("epsilon", "v_prediction"):  # gamma 0.1: weights far from 1 at most t, so an unweighted val loss stands out
        run(data, tmp_path / prediction, "--max-steps", "25", "--batch-size", "4", "--lr", "0", "--cond-drop", "0",
            "--log-every", "25", "--eval-every", "25", "--snr-gamma", "0.1", "--prediction", prediction)
        m = pd.read_csv(tmp_path / prediction / "metrics.csv")
        assert m.val_loss[0] == pytest.approx(m.loss[0], rel=0.2)


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    data = make_data(tmp_path / "d")
    flags = ["--max-steps", "6", "--batch-size", "4", "--grad-accum", "2", "--warmup-steps", "2",
             "--balance", "sqrt", "--cond-drop", "0.5", "--lr", "1e-3", "--ema-decay", "0.5", "--save-every", "2"]
    run(data, tmp_path / "straight", *flags)
    stop_after(3, monkeypatch, data, tmp_path / "stopped", *flags)  # the same run, stopped after step 3, then resumed
    train.main(["--resume", "--out-dir", str(tmp_path / "stopped")])  # every other flag comes from the checkpoint
    a, b = model.load_checkpoint(str(tmp_path / "straight")), model.load_checkpoint(str(tmp_path / "stopped"))
    assert b["step"] == 6
    assert sd_equal(a["model"], b["model"]) and sd_equal(a["ema"], b["ema"])  # bitwise
    assert all(sd_equal(a["optimizer"]["state"][k], b["optimizer"]["state"][k]) for k in a["optimizer"]["state"])


def test_resume_after_a_crash_logs_each_step_once_and_lets_the_loaded_checkpoint_go(tmp_path, monkeypatch):
    """kill -9 after step 3 was logged and while step 4's row was being written, ckpt.pt from step 2: the resumed run
    trains steps 3-4 again and metrics.csv ends with one row per step. The loaded checkpoint (~1.8 GB at base, per
    rank) is freed once its tensors are in the model, EMA and optimizer."""
    data, out = make_data(tmp_path / "d"), tmp_path / "run"
    flags = ["--batch-size", "4", "--log-every", "1", "--save-every", "2"]
    run(data, out, "--max-steps", "2", *flags)
    train.append_metrics(str(out / "metrics.csv"), 3, 9.0, "123", "0.001", "10")  # what the lost run logged
    with open(out / "metrics.csv", "a") as f:
        f.write("4,9.5,12")  # cut mid-row
    refs, freed, real_load, real_ema_update = [], [], train.load_checkpoint, train.ema_update

    def load_checkpoint(path):  # watches the loaded tensors
        ckpt = real_load(path)
        refs.extend(weakref.ref(v) for v in ckpt["model"].values())
        return ckpt

    def ema_update(ema, net, decay):  # in every training step: are they gone?
        freed.append(all(r() is None for r in refs))
        real_ema_update(ema, net, decay)
    monkeypatch.setattr(train, "load_checkpoint", load_checkpoint)
    monkeypatch.setattr(train, "ema_update", ema_update)
    run(data, out, "--max-steps", "4", "--resume", *flags)
    m = pd.read_csv(out / "metrics.csv")
    assert m.step.tolist() == [1, 2, 3, 4] and m.loss[2] != 123 and np.isfinite(m.loss).all()
    assert refs and freed == [True, True]


@pytest.mark.slow
def test_lr_and_warmup_defaults_follow_the_preset_and_run_length(tmp_path):
    """Defaults chosen by the sweep: the preset's peak LR, warmup max-steps/80 capped at 1000; kept on --resume."""
    data = make_data(tmp_path / "data")
    run(data, tmp_path / "run", "--max-steps", "160", "--batch-size", "2", "--log-every", "1")
    args = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["args"]
    assert (args["lr"], args["warmup_steps"], args["loss"], args["prediction"]) == (train.PRESET_LR["tiny"], 2, "mse", "v_prediction")
    lr = pd.read_csv(tmp_path / "run" / "metrics.csv").lr
    assert lr[0] == pytest.approx(train.PRESET_LR["tiny"] / 2) and lr.max() == pytest.approx(train.PRESET_LR["tiny"])
    run(data, tmp_path / "run", "--max-steps", "161", "--resume")  # one more step, the run's own LR
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["args"]["lr"] == train.PRESET_LR["tiny"]
    assert train.PRESET_LR["base"] == 1e-4 and min(1000, 100_000 // train.WARMUP_SHARE) == 1000  # the original's, long runs


def test_a_checkpoint_from_before_v_prediction_resumes_as_eps(tmp_path):
    data, out = make_data(tmp_path / "data"), tmp_path / "run"
    run(data, out, "--max-steps", "2", "--batch-size", "2", "--prediction", "epsilon")
    ckpt = model.load_checkpoint(str(out))
    del ckpt["schedule"], ckpt["args"]["prediction"], ckpt["args"]["shift"]  # as train.py wrote them before
    model.save_checkpoint(out / "ckpt.pt", ckpt)
    assert model.schedule_of(ckpt).config.prediction_type == "epsilon"  # sample.py reads it as eps
    train.main(["--resume", "--out-dir", str(out), "--max-steps", "3"])
    ckpt = model.load_checkpoint(str(out))
    assert ckpt["step"] == 3 and ckpt["args"]["prediction"] == "epsilon" and ckpt["schedule"]["prediction"] == "epsilon"
    ckpt["args"]["prediction"] = "eps"  # the short name runs saved before the flag took diffusers' names
    model.save_checkpoint(out / "ckpt.pt", ckpt)
    train.main(["--resume", "--out-dir", str(out), "--max-steps", "4"])
    assert model.load_checkpoint(str(out))["args"]["prediction"] == "epsilon"


def test_first_step_ema_warmup_and_run_folder_guards(tmp_path):
    data, out = make_data(tmp_path / "d"), tmp_path / "run"
    unet, ema = run(data, out, "--max-steps", "1", "--batch-size", "4", "--seed", "3")
    torch.manual_seed(3)  # train.py seeds, then builds: the initial weights
    init = model.build_unet(32, "tiny").state_dict()
    decay = min(0.9999, (1 + 0) / (10 + 0))  # EMA warm-up: the first update keeps only 10% of the init
    for k, v in ema.state_dict().items():
        assert torch.allclose(v, decay * init[k] + (1 - decay) * unet.state_dict()[k], atol=1e-6), k
    with pytest.raises(SystemExit, match="train.py: error: .*already holds a run.*--resume"):  # never overwrite
        run(data, out, "--max-steps", "2")
    data64 = make_data(tmp_path / "d64", size=64)
    with pytest.raises(SystemExit, match="train.py: error: --resume: .*trained at 32px"):
        train.main(["--resume", "--out-dir", str(out), "--data-dir", data64, "--image-size", "64"])
    ckpt = model.load_checkpoint(str(out))
    ckpt["classes"] = model.CLASSES[:5]
    model.save_checkpoint(str(out / "ckpt.pt"), ckpt)
    with pytest.raises(SystemExit, match="train.py: error: --resume: .*classes"):
        train.main(["--resume", "--out-dir", str(out)])


def test_png_fallback_decodes_in_workers(tmp_path):
    data = make_data(tmp_path / "d", cache=False, png_size=40)  # --no-cache layout: cache_row -1, PNGs of another size
    unet, _ = run(data, tmp_path / "run", "--max-steps", "2", "--batch-size", "4", "--num-workers", "1")
    ckpt = model.load_checkpoint(str(tmp_path / "run"))
    assert ckpt["step"] == 2 and ckpt["image_size"] == 32 and unet.config.sample_size == 32


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data, out = make_data(tmp_path / "d"), tmp_path / "run"
    with pytest.raises(SystemExit, match="train.py: error: loss is (nan|inf) at step") as e:
        run(data, out, "--max-steps", "20", "--batch-size", "4", "--lr", "1e30", "--warmup-steps", "0",
            "--clip", "0", "--log-every", "1", "--save-every", "1")
    bad_step = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    assert model.load_checkpoint(str(out))["step"] == bad_step - 1  # the step before the bad one, not overwritten


@pytest.mark.parametrize("case, flags, message", [
    ("no data", ["--data-dir", "{tmp}/nothing"], "no train.csv; prepare the data first: python prepare_data.py"),
    ("empty split", ["--data-dir", "{tmp}/empty"], "train.csv: the train split has no rows"),
    ("size vs cache", ["--data-dir", "{tmp}/d", "--image-size", "64"], "--image-size 64 does not match .*cache.npy"),
    ("batch 0", ["--data-dir", "{tmp}/d", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    ("preset", ["--data-dir", "{tmp}/d", "--preset", "huge"], "--preset huge: unknown; choose from auto, base, small, tiny"),
    ("size vs preset", ["--data-dir", "{tmp}/d", "--preset", "small", "--image-size", "48"], "does not fit preset"),
    ("cut short", ["--data-dir", "{tmp}/d"], r"d/cache.npy is damaged \(cut short\?\): prepare the data again with "
     "prepare_data.py"),
])
def test_bad_input_is_one_line_error(tmp_path, case, flags, message):
    make_data(tmp_path / "d")
    os.makedirs(tmp_path / "empty")
    pd.DataFrame(columns=["image_index", "patient_id", "label", "class_id", "path", "cache_row"]).to_csv(
        tmp_path / "empty" / "train.csv", index=False)
    argv = ["--out-dir", str(tmp_path / "run"), *TINY, *[f.format(tmp=tmp_path) for f in flags]]
    if case == "size vs preset":  # no cache, so any size is accepted by the data and refused by the model
        os.remove(tmp_path / "d" / "cache.npy")
    if case == "cut short":  # an interrupted copy: np.load(mmap_mode="r") raised "mmap length is greater than ..."
        os.truncate(tmp_path / "d" / "cache.npy", os.path.getsize(tmp_path / "d" / "cache.npy") // 2)
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert str(e.value).startswith("train.py: error: ") and "\n" not in str(e.value)
    assert re.search(message, str(e.value)), str(e.value)
    assert not os.path.exists(tmp_path / "run")  # nothing written

# -----------------------------------------------------------------------------
# processes: DDP on CPU (gloo) and SIGTERM


@pytest.mark.slow
def test_two_process_ddp_ends_with_identical_weights_and_one_set_of_outputs(tmp_path):
    data, out = make_data(tmp_path / "d"), tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --compile with torch.compile stubbed (inductor takes minutes here): it says what it was given to wrap
    code = ("import sys, torch, train; torch.compile = lambda m, **k: print('compiled', type(m).__name__) or m; "
            "unet, ema = train.main(sys.argv[2:]); torch.save(unet.state_dict(), sys.argv[1])")
    argv = ["--data-dir", data, "--out-dir", str(out), *TINY, "--max-steps", "3", "--batch-size", "4",
            "--grad-accum", "2", "--log-every", "1", "--compile"]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"rank{r}.pt"), *argv], cwd=REPO,
                              env=dict(ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    try:
        logs = [p.communicate(timeout=180)[0].decode() for p in procs]
    finally:  # a hung rank must not outlive the test
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert sd_equal(w0, w1)
    assert sd_equal(w0, model.load_checkpoint(str(out))["model"])  # the bare UNet's keys: no module. / _orig_mod.
    assert "compiled DistributedDataParallel" in logs[0]  # compile(DDP(unet)): the all-reduce overlaps the backward
    assert pd.read_csv(out / "metrics.csv").step.tolist() == [1, 2, 3]  # rank 0 alone writes
    assert "step 1 | loss" in logs[0] and "step 1 | loss" not in logs[1]
    assert model.load_checkpoint(str(out))["samples_seen"] == 3 * 4 * 2 * 2  # steps x batch x accum x ranks


@pytest.mark.slow
def test_sigterm_twice_mid_run_saves_the_step_reached_and_exits_0(tmp_path):
    """SLURM signals the job step and torchrun forwards it: a second SIGTERM must not abort (only a 2nd Ctrl-C may)."""
    data, out = make_data(tmp_path / "d"), tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-u", "train.py", "--data-dir", data, "--out-dir", str(out), *TINY,
                          "--max-steps", "100000", "--batch-size", "4", "--log-every", "1", "--save-every", "0"],
                         cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:
        if line.startswith("step "):  # training is under way
            p.send_signal(signal.SIGTERM)
            break
    for line in p.stdout:
        if "finishing the step" in line:  # the first one was handled: the second cannot merge with it
            p.send_signal(signal.SIGTERM)
            break
    rest = p.communicate(timeout=120)[0]
    assert p.returncode == 0, rest
    ckpt = model.load_checkpoint(str(out))
    last_logged = int(re.findall(r"^step (\d+) \| loss", rest, re.M)[-1])
    assert 1 <= ckpt["step"] == last_logged < 100000 and f"train.py: step {ckpt['step']}: wrote" in rest

# -----------------------------------------------------------------------------
# the GPU code paths, driven on the CPU: the --amp auto decision, bf16 autocast, channels_last + fused AdamW, compile


@pytest.mark.parametrize("capability, amp", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_amp_auto_takes_bf16_only_on_gpus_with_bf16_cores(monkeypatch, capability, amp):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # true on a V100 / T4 too (emulated)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert model.auto_amp(torch.device("cuda")) == amp  # train.py --amp auto, sample.py and bench.py all ask it
    assert model.auto_amp(torch.device("cuda", 0)) == amp
    assert model.auto_amp(torch.device("cpu")) == "off"  # the CPU trains in fp32 unless --amp bf16


def test_fp16_on_the_cpu_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^train.py: error: --amp fp16: .*fp16 needs CUDA") as e:
        run(make_data(tmp_path / "d"), tmp_path / "run", "--amp", "fp16")
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "run")


def train_stop_resume(tmp_path, monkeypatch, *flags):
    """4 steps straight vs 2 steps, SIGTERM, --resume (flags from the checkpoint). Returns both final checkpoints
    and the UNet of the resumed run, after checking that the loss stayed finite and the weights moved."""
    data = make_data(tmp_path / "d")
    flags = ["--max-steps", "4", "--batch-size", "4", "--warmup-steps", "1", "--lr", "1e-3", "--log-every", "1",
             "--eval-every", "2", "--sample-every", "4", "--sample-per-class", "1", *flags]
    run(data, tmp_path / "straight", *flags)
    stop_after(2, monkeypatch, data, tmp_path / "stopped", *flags)
    unet, _ = train.main(["--resume", "--out-dir", str(tmp_path / "stopped")])
    a, b = model.load_checkpoint(str(tmp_path / "straight")), model.load_checkpoint(str(tmp_path / "stopped"))
    assert a["step"] == b["step"] == 4
    for out in ("straight", "stopped"):
        m = pd.read_csv(tmp_path / out / "metrics.csv")
        assert m.step.tolist() == [1, 2, 3, 4] and np.isfinite(m.loss).all()
        assert m.val_loss.notna().tolist() == [False, True, False, True] and np.isfinite(m.val_loss.dropna()).all()
    torch.manual_seed(0)
    init = model.build_unet(32, "tiny").state_dict()
    assert all(not torch.equal(a["model"][k], init[k]) for k in ("conv_in.weight", "conv_out.weight"))
    assert not any("_orig_mod" in k for k in a["model"])
    return a, b, unet


@pytest.mark.slow
def test_bf16_autocast_on_the_cpu_trains_and_resumes(tmp_path, monkeypatch):
    dtypes, real_build_unet = [], train.build_unet

    def build_unet_spy(*a):  # records the dtype the first conv computes in, at every forward
        unet = real_build_unet(*a)
        unet.conv_in.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
        return unet
    monkeypatch.setattr(train, "build_unet", build_unet_spy)
    run(make_data(tmp_path / "d0"), tmp_path / "auto", "--max-steps", "1", "--batch-size", "4")
    assert set(dtypes) == {torch.float32}  # --amp auto on the CPU: fp32
    dtypes.clear()
    a, b, _ = train_stop_resume(tmp_path, monkeypatch, "--amp", "bf16")
    assert set(dtypes) == {torch.bfloat16}  # training, val loss, sample grid: all under autocast, resumed run too
    assert b["args"]["amp"] == "bf16"
    assert sd_equal(a["model"], b["model"]) and sd_equal(a["ema"], b["ema"])  # resume is exact in bf16 as well
    assert all(v.dtype == torch.float32 for v in a["model"].values())  # autocast: the weights stay fp32


@pytest.mark.skipif(torch.__version__ < (2, 4), reason="fused AdamW on a CPU needs torch >= 2.4 (train.py says so)")
@pytest.mark.slow
def test_fast_path_channels_last_and_fused_adamw_on_the_cpu_trains_and_resumes(tmp_path, monkeypatch):
    a, b, unet = train_stop_resume(tmp_path, monkeypatch, "--fast-path")
    assert all(g["fused"] for ckpt in (a, b) for g in ckpt["optimizer"]["param_groups"])
    convs = [p for p in unet.parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)  # really NHWC, not a layout both formats share
    assert sd_equal(a["model"], b["model"]) and sd_equal(a["ema"], b["ema"])
    assert all(sd_equal(a["optimizer"]["state"][k], b["optimizer"]["state"][k]) for k in a["optimizer"]["state"])
    # the default on the CPU is unchanged: contiguous weights, the foreach AdamW
    unet, _ = run(make_data(tmp_path / "d1"), tmp_path / "plain", "--max-steps", "1", "--batch-size", "4")
    assert all(p.is_contiguous() for p in unet.parameters())
    assert not model.load_checkpoint(str(tmp_path / "plain"))["optimizer"]["param_groups"][0]["fused"]


@pytest.mark.skipif(torch.__version__ < (2, 4), reason="fused AdamW on a CPU needs torch >= 2.4 (train.py says so)")
def test_resume_across_the_gpu_path_continues_the_run_with_this_runs_optimizer(tmp_path, monkeypatch):
    """A GPU checkpoint (channels_last Adam moments, fused AdamW in its param_groups) resumed on a CPU, and a CPU one
    resumed on the GPU path (--fast-path stands in for both): each ends where the uninterrupted run it began as ends,
    to float tolerance (its last 2 of 4 steps ran on the other path, which rounds differently: ~1e-6 here). Before, the
    first was off by 1.7e-3 (moments read in the wrong layout), the second lost fused AdamW, and a new --weight-decay
    on resume was ignored."""
    data = make_data(tmp_path / "d")
    flags = ["--max-steps", "4", "--batch-size", "4", "--warmup-steps", "1", "--lr", "1e-3", "--save-every", "2"]
    for kind, fast in (("gpu", ["--fast-path"]), ("cpu", [])):
        run(data, tmp_path / kind, *flags, *fast)
        stop_after(2, monkeypatch, data, tmp_path / f"{kind}-switched", *flags, *fast)
    ckpt = model.load_checkpoint(str(tmp_path / "gpu-switched"))
    moments = [v for s in ckpt["optimizer"]["state"].values() for v in (s["exp_avg"], s["exp_avg_sq"]) if v.dim() == 4]
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in moments)  # saved in NHWC, really
    assert not all(v.is_contiguous() for v in moments)
    ckpt["args"]["fast_path"] = False  # as a CUDA run's checkpoint reads on a CPU
    model.save_checkpoint(str(tmp_path / "gpu-switched" / "ckpt.pt"), ckpt)
    train.main(["--resume", "--out-dir", str(tmp_path / "gpu-switched")])
    train.main(["--resume", "--out-dir", str(tmp_path / "cpu-switched"), "--fast-path"])
    for kind, fused in (("gpu", False), ("cpu", True)):
        a, b = model.load_checkpoint(str(tmp_path / kind)), model.load_checkpoint(str(tmp_path / f"{kind}-switched"))
        assert b["step"] == 4 and max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) < 1e-5
        assert bool(b["optimizer"]["param_groups"][0]["fused"]) == fused  # this run's device decides
    train.main(["--resume", "--out-dir", str(tmp_path / "cpu-switched"), "--max-steps", "5", "--weight-decay", "0.3"])
    assert model.load_checkpoint(str(tmp_path / "cpu-switched"))["optimizer"]["param_groups"][0]["weight_decay"] == 0.3


@pytest.mark.skipif(not os.environ.get("TEST_COMPILE"), reason="torch.compile of the tiny UNet takes ~150 s on this "
                    "2-core CPU with a cold inductor cache (~6 s warm): set TEST_COMPILE=1 to run it")
def test_compile_on_the_cpu_trains_and_resumes(tmp_path, monkeypatch):
    a, b, _ = train_stop_resume(tmp_path, monkeypatch, "--compile", "--fast-path")
    assert b["args"]["compile"]
    assert sd_equal(a["model"], b["model"]) and sd_equal(a["ema"], b["ema"])


def test_resume_starts_a_new_run_and_rerunning_a_finished_one_changes_nothing(tmp_path, capsys):
    data, ckpt = make_data(tmp_path / "d"), tmp_path / "r" / "ckpt.pt"
    cmd = ["--resume", "--max-steps", "3", "--seed", "1"]  # the quickstart's way: one command, safe to run again
    run(data, tmp_path / "r", *cmd)
    first = torch.load(ckpt, weights_only=True)
    assert first["step"] == 3
    assert f"train.py: step 3: wrote {ckpt}\n" in capsys.readouterr().out
    unet, _ = run(data, tmp_path / "r", *cmd)
    again = torch.load(ckpt, weights_only=True)
    assert again["step"] == 3 and sd_equal(again["model"], first["model"]) and sd_equal(unet.state_dict(), first["model"])
    said = capsys.readouterr().out  # says so, and does not claim to have written ckpt.pt
    assert f"the run was already at step 3 (--max-steps 3): nothing trained, {ckpt} unchanged" in said
    assert f"wrote {ckpt}" not in said


def test_progress_bar_into_a_log_file_redraws_rarely(tmp_path, monkeypatch, capsys):
    """stderr not a terminal (capsys; a redirected log): no redraw every 0.1 s (a 37-minute run logged ~120 KB of bars),
    but the bar's start and end still show."""
    data, real_ema_update = make_data(tmp_path / "d"), train.ema_update

    def slow_ema_update(*a):  # 20 steps of >= 0.05 s: at tqdm's default 0.1 s a dozen redraws
        time.sleep(0.05)
        real_ema_update(*a)
    monkeypatch.setattr(train, "ema_update", slow_ema_update)
    run(data, tmp_path / "run", "--max-steps", "20", "--batch-size", "2")
    err = capsys.readouterr().err
    assert err.count("\r") <= 3 and "20/20" in err, err


def test_resume_without_out_dir_continues_the_default_run_folder(tmp_path, monkeypatch):
    """--resume and no --out-dir: the run in runs/<data dir>-<preset>-<size>, found again on every rerun."""
    data = make_data(tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    for steps in ("1", "2"):
        train.main(["--data-dir", data, *TINY, "--resume", "--batch-size", "4", "--max-steps", steps])
    assert model.load_checkpoint(str(tmp_path / "runs" / "d-tiny-32"))["step"] == 2
