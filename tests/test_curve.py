"""curve.py: every EMA snapshot of a run scored once through sample.py + evaluate.py, then drawn."""
import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import curve
import model
import train
from test_train import TINY, make_data

pytestmark = pytest.mark.slow  # every test runs the instrument whole


# the reference classifier trained for a few steps: the plumbing, not the numbers
FAST_EVALUATE = ["--evaluate-args", "--width 8 --epochs 1 --epoch-steps 5 --repeats 5 --device cpu"]


def test_scores_each_snapshot_once_and_plots_runs_side_by_side(tmp_path):
    data = make_data(tmp_path / "d", counts=(8, 0, 0, 0, 8, 0))
    run = tmp_path / "run"
    train.main(["--data-dir", data, "--out-dir", str(run), *TINY, "--max-steps", "4", "--snapshot-every", "2"])
    score = ["--run", str(run), "--data-dir", data, "--n", "4", "--steps", "3", "--guidance", "1.5", *FAST_EVALUATE]
    curve.main(score)
    rows = pd.read_csv(run / "curve.csv")
    assert rows["step"].tolist() == [2, 4] and (rows["minutes"].diff().dropna() > 0).all()
    assert {"fidelity No Finding", "fidelity Pneumonia", "fd_ratio", "fd_ratio_worst", "kid", "grain_ratio",
            "gradient_ratio_worst", "grainy_pct_worst"} <= set(rows.columns)
    assert rows["fidelity_over_real_worst"].between(0, 10).all() and (rows["fd_ratio"] > 0).all()
    assert (rows["grain_ratio"] > 0).all()  # the worst class is the one furthest from real films, smoother or grainier
    assert (np.log(rows["grain_ratio_worst"]).abs() >= np.log(rows["grain_ratio"]).abs() - 1e-9).all()
    curve.main(score)  # snapshots already scored are skipped
    assert len(pd.read_csv(run / "curve.csv")) == 2
    curve.main(score[:4] + ["--seconds-per-step", "30", "--n", "4", "--steps", "3"])  # nothing new: still 2 rows
    assert len(pd.read_csv(run / "curve.csv")) == 2

    png, old = tmp_path / "figs" / "curve.png", tmp_path / "old.csv"  # a csv from before the grainy share still draws
    rows.drop(columns=["grain_ratio", "grain_ratio_worst", "gradient_ratio_worst", "grainy_pct_worst"]).to_csv(
        old, index=False)
    curve.main(["--plot", str(run / "curve.csv"), str(old), "--labels", "a", "b", "--out", str(png)])
    assert Image.open(png).size == (3 * 560, 300 + 40)  # fidelity, FD ratio, grainy films


def test_rare_class_benchmark_cuts_trains_samples_scores_and_plots(tmp_path):
    data = make_data(tmp_path / "d", counts=(8, 0, 0, 0, 8, 0))
    argv = ["--rare", "Pneumonia", "--data-dir", data, "--k", "3", "all", "--out-dir", str(tmp_path / "rare"),
            "--max-steps", "2", "--train-batch-size", "4", "--utility-seeds", "1", "--batch-size", "8", *FAST_EVALUATE]
    table = curve.main(argv)
    cut = pd.read_csv(tmp_path / "rare" / "k3" / "data" / "train.csv")
    assert (cut["label"] == "Pneumonia").sum() == 3 and (cut["label"] == "No Finding").sum() == 8  # only the rare class
    for split in ("val", "test"):  # untouched
        assert pd.read_csv(tmp_path / "rare" / "k3" / "data" / f"{split}.csv").equals(pd.read_csv(f"{data}/{split}.csv"))
    assert table["k"].tolist() == [3, 8] and table["n_synthetic"].tolist() == [5, 8]  # balance the classes; else k
    for col in ("train auc", "train+synth auc", "diff auc", "train sens", "train+synth sens_lo", "memorized",
                "train-aug auc", "train-weighted auc", "ceiling auc", "best baseline auc", "gain auc_lo", "gap auc"):
        assert table[col].notna().all()
    assert table["ceiling auc"].iloc[1] == pytest.approx(table["train auc"].iloc[1], abs=1e-3)  # k = all: the ceiling
    assert (table["train auc_lo"] <= table["train auc"]).all() and (table["train auc"] <= table["train auc_hi"]).all()
    assert pd.read_csv(tmp_path / "rare" / "rare.csv").shape == table.shape
    curve.main(argv[:4] + ["--k", "3", "--out-dir", str(tmp_path / "rare"), "--max-steps", "2", "--train-batch-size", "4",
                           "--utility-seeds", "1", "--batch-size", "8", "--filter", "new", *FAST_EVALUATE])  # k=3, other settings
    both = pd.read_csv(tmp_path / "rare" / "rare.csv")
    assert len(both) == 3 and both["filter"].tolist() == ["none", "none", "new"]  # added, the others kept
    assert Image.open(tmp_path / "rare" / "rare.png").size == (2 * 560, 340)
    manifest = pd.read_csv(tmp_path / "rare" / "k3" / "run-none-2" / "samples-w1.25-n5" / "manifest.csv")
    assert set(manifest["label"]) == {"Pneumonia"} and (manifest["synthetic"] == 1).all()
    report = json.loads((tmp_path / "rare" / "k3" / "report" / "report.json").read_text())
    assert "synth" not in report["utility"]  # no "synthetic only" AUC from films of one class
    mtime = os.path.getmtime(tmp_path / "rare" / "k3" / "run-none-2" / "ckpt.pt")
    curve.main(argv)  # run again: the generators and samples are reused
    assert os.path.getmtime(tmp_path / "rare" / "k3" / "run-none-2" / "ckpt.pt") == mtime
    with pytest.raises(SystemExit, match="--k 99: a number from 1 to 8"):
        curve.main(argv[:4] + ["--k", "99"])

    # --pool cut: the 5 rare films cut away stay, unlabelled: the generator's null condition, the pseudo-label baseline
    table = curve.main(argv[:4] + ["--k", "3", "--pool", "cut", "--sample-args", "--steps 3", "--train-lr", "1e-3"]
                       + argv[7:])  # and a generator LR of its own: a generator of its own
    gen = tmp_path / "rare" / "k3-pool-cut" / "run-none-2-lr0.001"
    assert (gen / "samples-w1.25-n5-steps3" / "manifest.csv").exists()
    assert model.load_checkpoint(gen / "ckpt.pt")["args"]["lr"] == 1e-3
    pooled = pd.read_csv(tmp_path / "rare" / "k3-pool-cut" / "data" / "train.csv")
    assert (pooled["label"] == "Pneumonia").sum() == 3 and pooled["label"].isna().sum() == 5
    assert (pooled.loc[pooled["label"].isna(), "class_id"] == -1).all()
    assert table["pool"].tolist() == ["cut"] and table["pseudo auc"].notna().all()
    assert len(pd.read_csv(tmp_path / "rare" / "rare.csv")) == 4  # a row of its own beside the labelled-only ones


def test_bad_input_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no snapshots"):
        curve.main(["--run", str(tmp_path / "empty"), "--data-dir", str(tmp_path)])
    (tmp_path / "empty" / "snapshots").mkdir()
    (tmp_path / "empty" / "snapshots" / "ema_step000001.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="no test.csv"):
        curve.main(["--run", str(tmp_path / "empty"), "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="no such file"):
        curve.main(["--plot", str(tmp_path / "nothing.csv")])
    with pytest.raises(SystemExit, match="give --run and --data-dir"):
        curve.main([])
