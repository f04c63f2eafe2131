"""curve.py: every EMA snapshot of a run scored once through sample.py + evaluate.py, then drawn."""
import pandas as pd
import pytest
from PIL import Image

import curve
import train
from test_train import TINY, make_data


@pytest.fixture
def fast_evaluate(monkeypatch):  # the reference classifier trained for a few steps: the plumbing, not the numbers
    real = curve.evaluate.main
    monkeypatch.setattr(curve.evaluate, "main", lambda argv: real(
        argv + ["--width", "8", "--epochs", "1", "--epoch-steps", "5", "--repeats", "5", "--device", "cpu"]))


def test_scores_each_snapshot_once_and_plots_runs_side_by_side(tmp_path, fast_evaluate):
    data = make_data(tmp_path / "d", counts=(8, 0, 0, 0, 8, 0))
    run = tmp_path / "run"
    train.main(["--data-dir", data, "--out-dir", str(run), *TINY, "--max-steps", "4", "--snapshot-every", "2"])
    score = ["--run", str(run), "--data-dir", data, "--n", "4", "--steps", "3", "--guidance", "1.5"]
    curve.main(score)
    rows = pd.read_csv(run / "curve.csv")
    assert rows["step"].tolist() == [2, 4] and (rows["minutes"].diff().dropna() > 0).all()
    assert {"fidelity No Finding", "fidelity Pneumonia", "fd_ratio", "fd_ratio_worst", "kid"} <= set(rows.columns)
    assert rows["fidelity_over_real_worst"].between(0, 10).all() and (rows["fd_ratio"] > 0).all()
    curve.main(score)  # snapshots already scored are skipped
    assert len(pd.read_csv(run / "curve.csv")) == 2
    curve.main(score[:4] + ["--seconds-per-step", "30", "--n", "4", "--steps", "3"])  # nothing new: still 2 rows
    assert len(pd.read_csv(run / "curve.csv")) == 2

    png = tmp_path / "figs" / "curve.png"
    curve.main(["--plot", str(run / "curve.csv"), str(run / "curve.csv"), "--labels", "a", "b", "--out", str(png)])
    assert Image.open(png).size == (2 * 560, 300 + 40)


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
