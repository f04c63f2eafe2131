import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image
import torch

import bench
import model

pytestmark = pytest.mark.slow  # every test runs the instrument whole

QUICK = ["--quick", "--device", "cpu", "--timed-steps", "1", "--png-images", "2", "--ddpm-steps", "2"]


def spy_on_scripts(monkeypatch, fake=None):
    """Records each pipeline script bench.py runs (its command line); fake(cmd, stdout) may stand in for one run."""
    calls, real_run = [], subprocess.run

    def run(cmd, stdout=None, **kw):
        if cmd[0] != sys.executable:  # not a script (platform.processor() runs uname)
            return real_run(cmd, stdout=stdout, **kw)
        calls.append([os.path.basename(cmd[1]), *cmd[2:]])
        done = fake(calls[-1], stdout) if fake else None
        return done if done is not None else real_run(cmd, stdout=stdout, **kw)
    monkeypatch.setattr(bench.subprocess, "run", run)
    return calls


def test_a_configuration_out_of_memory_is_an_oom_row_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def oom(cmd, stdout):  # the fp32 eager train.py run does not fit (as batch 32, 256 px on 80 GB); the others run
        if cmd[0] != "train.py":  # (stood in for: their metrics.csv, as train.py writes it)
            return None
        if "--no-fast-path" in cmd and "off" in cmd:
            stdout.write("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 70.00 GiB\n")
            return subprocess.CompletedProcess(cmd, 1)
        out = cmd[cmd.index("--out-dir") + 1]
        os.makedirs(out)
        with open(os.path.join(out, "metrics.csv"), "w") as f:
            f.write("step,time_s,loss,lr,img_per_s,val_loss\n1,0.5,0.9,0.001,16.0,\n2,1.0,0.8,0.001,20.0,\n")
        return subprocess.CompletedProcess(cmd, 0)
    real_sample = model.sample

    def sample(unet, labels, sampler, *a, **kw):  # nor does the ddpm sampler: an older torch's plain RuntimeError
        if sampler == "ddpm":
            raise RuntimeError("CUDA error: out of memory")
        return real_sample(unet, labels, sampler, *a, **kw)
    spy_on_scripts(monkeypatch, oom)
    monkeypatch.setattr(model, "sample", sample)
    no_data = ["--data-dir", str(tmp_path / "data")]  # train.py is stood in for: no demo data to prepare
    report = bench.main([*QUICK, *no_data, "--out-dir", str(tmp_path)])
    assert report == json.loads((tmp_path / "bench.json").read_text())
    eager, *faster = report["train"]
    assert eager == {"batch": 8, "config": "fp32 eager", "precision": "fp32", "flags": "--amp off --no-fast-path",
                     "error": "OOM"}
    ran = [(r["img_s"], r["ms_per_step"]) for r in faster if "error" not in r]  # the fused row needs torch 2.4
    assert ran == [(20.0, 400.0)] * (2 if torch.__version__ >= (2, 4) else 1)  # the last row's img/s: batch 8
    assert [r.get("error") for r in report["sample"]] == [None, None, "OOM", None]
    assert all(r["img_s"] > 0 for r in report["sample"] if "error" not in r)
    table = capsys.readouterr().out
    assert "| 8 | fp32 eager (`--amp off --no-fast-path`) | fp32 | OOM | - | - | - | - |" in table
    faster = [line for line in table.splitlines() if line.startswith("| 8 | + ")]
    assert len(faster) == 2 and all(line.endswith("| - |") for line in faster)  # no ratio to a row that did not run
    assert "| ddpm 2 | fp32 | OOM | - |" in table and "| DDPMPipeline 2 | fp32 |" in table and "| x1.00 |" in table

    def bug(cmd, stdout):  # any other failure of train.py ends bench.py with train.py's last line
        if cmd[0] == "train.py":
            stdout.write("Traceback (most recent call last):\nValueError: mat1 and mat2 shapes cannot be multiplied\n")
            return subprocess.CompletedProcess(cmd, 1)
    spy_on_scripts(monkeypatch, bug)
    with pytest.raises(SystemExit, match="train.py --amp off --no-fast-path failed .exit 1.: ValueError: mat1"):
        bench.main([*QUICK, *no_data, "--out-dir", str(tmp_path / "bug")])


def test_errors_other_than_out_of_memory_are_not_swallowed():
    def bug():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes"):
        bench.guarded(bug, torch.device("cpu"))
    assert bench.guarded(lambda: {"img_s": 1.0}, torch.device("cpu")) == {"img_s": 1.0}


def test_gpu_check_runs_whole_on_a_cpu_and_times_train_py_itself(tmp_path, monkeypatch):
    """The GPU check, as a GPU runs it, on a CPU with --quick: prepare_data.py --demo, train.py, sample.py and export.py
    as subprocesses (a loss curve and a sample grid), then the tables, each training row train.py itself on the same
    demo data, and the targets. These six files are all it writes."""
    calls = spy_on_scripts(monkeypatch)
    report = bench.main(["--gpu-check", *QUICK, "--timed-steps", "2", "--peak-tflops", "1", "--train-steps", "12",
                         "--out-dir", str(tmp_path)])
    files = {"bench.json", "bench.md", "gpu_check.log", "metrics.csv", "loss_curve.png", "samples.png"}
    assert {p.name for p in tmp_path.iterdir()} == files
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(report))
    assert [r["exit"] for r in report["loop"]["commands"]] == [0, 0, 0, 0]
    assert all(math.isfinite(v) for v in report["loop"]["loss"] + report["loop"]["val_loss"])
    md = (tmp_path / "bench.md").read_text()
    assert "| MFU at batch 32, fastest row | - | >= 45% |" in md and "| img/s at batch 8, fastest row |" in md
    loop = "`python train.py --data-dir $WORK/data --out-dir $WORK/loop --preset tiny --batch-size 8 --max-steps 12"
    assert loop in md
    log = (tmp_path / "gpu_check.log").read_text()
    assert "wrote 24 synthetic images" in log and "export.py: step 12 EMA weights" in log  # on the checkpoint
    grid, curve = Image.open(tmp_path / "samples.png"), Image.open(tmp_path / "loss_curve.png")
    assert grid.text["synthetic"] == "1" and grid.height == 6 * 32 and curve.size == (640, 360)

    assert report["preset"] == "tiny" and report["image_size"] == 32 and report["flops_per_image_fwd"] > 0
    d = report["data"]
    assert math.isclose(d["cache_over_png"], d["cache_img_s_per_worker"] / d["png_decode_img_s_per_worker"])
    # one speed-up more per row (compile: not with --quick); on the CPU autocast is bf16, as train.py --amp bf16
    assert [(r["batch"], r["config"], r["precision"], r["flags"]) for r in report["train"]] == [
        (8, "fp32 eager", "fp32", "--amp off --no-fast-path"),
        (8, "+ autocast", "bf16 autocast", "--amp bf16 --no-fast-path"),
        (8, "+ channels_last, fused AdamW", "bf16 autocast", "--amp bf16 --fast-path")]
    # each row is train.py itself on the loop's demo data: 2 steps to warm up, 2 timed (its own clock, its img/s)
    fused = torch.__version__ >= (2, 4)  # fused AdamW on a CPU came with torch 2.4: before, that row says so
    loop_scripts = ["prepare_data.py", "train.py", "sample.py", "export.py"]
    assert [c[0] for c in calls] == loop_scripts + (3 if fused else 2) * ["train.py"]
    assert fused or report["train"][2]["error"] == "needs torch 2.4"
    for cmd, r in zip(calls[len(loop_scripts):], report["train"]):
        assert cmd[cmd.index("--data-dir") + 1] == calls[1][calls[1].index("--data-dir") + 1]
        assert " ".join(cmd).endswith("--batch-size 8 --max-steps 4 --log-every 2 --eval-every 0 --sample-every 0 "
                                      f"--save-every 0 --device cpu {r['flags']}")
        assert math.isclose(r["img_s"], 8 / (r["ms_per_step"] / 1e3))
        assert math.isclose(r["mfu"], 3 * report["flops_per_image_fwd"] * r["img_s"] / 1e12)  # --peak-tflops 1
        assert r["peak_mem_gib"] is None  # a CUDA figure
    assert [(r["sampler"], r["precision"]) for r in report["sample"]] == [  # sample.py's precision: fp32 on a CPU
        ("ddim-2m 25, guidance 1.25", "fp32"), ("ddim-2m 25, no guidance", "fp32"), ("ddpm 2", "fp32"),
        ("DDPMPipeline 2", "fp32")]
    assert all(r["img_s"] > 0 for r in report["sample"])
    assert "| 8 | + channels_last, fused AdamW (`--amp bf16 --fast-path`) | bf16 autocast |" in md


def test_flops_scale_with_pixels_and_match_a_hand_count_for_one_conv():
    base = model.build_unet(256, "base")
    f128, f256 = bench.flops_per_image(base, 128), bench.flops_per_image(base, 256)
    assert 3.8 < f256 / f128 < 4.2  # convolutions dominate: 4x the pixels, about 4x the work
    conv_in = 2 * 1 * 128 * 3 * 3 * 256 * 256  # 2 * C_in * C_out * k * k * H * W: the first conv alone
    assert f256 > 100 * conv_in
    assert 4.5e11 < f256 < 5.5e11  # ~496 GFLOP a forward at 256x256: the number MFU divides by
