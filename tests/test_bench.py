import json
import math

import pytest
from PIL import Image
import torch

import bench
import model

pytestmark = pytest.mark.slow  # every test runs the instrument whole

QUICK = ["--quick", "--device", "cpu", "--timed-steps", "1", "--png-images", "2", "--ddpm-steps", "2"]


def test_quick_bench_measures_every_part_and_writes_bench_json(tmp_path, monkeypatch):
    built, fused, calls = [], [], []  # the UNets, each AdamW's fused flag, the target and EMA calls of the steps
    real_build, real_adamw, real_target, real_lerp = model.build_unet, torch.optim.AdamW, model.target, torch._foreach_lerp_
    monkeypatch.setattr(model, "build_unet", lambda *a: built.append(real_build(*a)) or built[-1])
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: fused.append(kw.get("fused")) or real_adamw(params, **kw))
    monkeypatch.setattr(model, "target", lambda *a: calls.append("target") or real_target(*a))
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: calls.append("ema") or real_lerp(*a))
    report = bench.main(["--quick", "--device", "cpu", "--steps", "2", "--png-images", "4", "--ddpm-steps", "10",
                         "--out-dir", str(tmp_path)])
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(report))
    assert report["preset"] == "tiny" and report["image_size"] == 32 and report["flops_per_image_fwd"] > 0
    d = report["data"]
    assert math.isclose(d["cache_over_png"], d["cache_img_s_per_worker"] / d["png_decode_img_s_per_worker"])
    # one speed-up more per row (compile only with --compile); on the CPU autocast is bf16, as train.py --amp bf16
    assert [(r["batch"], r["config"], r["precision"]) for r in report["train"]] == [
        (8, "fp32 eager", "fp32"), (8, "+ autocast", "bf16 autocast"), (8, "+ channels_last", "bf16 autocast"),
        (8, "+ fused AdamW", "bf16 autocast")]
    layouts = [u.conv_out.weight.is_contiguous() for u in built[1:5]]  # built[0] counts the FLOPs, built[5] samples
    cpu_fused = True if torch.__version__ >= (2, 4) else None  # fused AdamW on a CPU came with torch 2.4
    assert layouts == [True, True, False, False] and fused == [None, None, None, cpu_fused]
    assert calls == ["target", "ema"] * 4 * (1 + 2)  # train.py's whole step, EMA too: 4 rows x (warm-up + 2 timed)
    for r in report["train"]:
        assert math.isclose(r["img_s"], 8 / (r["ms_per_step"] / 1e3))
        assert r["mfu"] is None  # no peak is known for a CPU unless --peak-tflops gives one
    assert [(r["sampler"], r["precision"]) for r in report["sample"]] == [  # sample.py's precision: fp32 on a CPU
        ("ddim-2m 25, guidance 1.25", "fp32"), ("ddim-2m 25, no guidance", "fp32"), ("ddpm 10", "fp32"),
        ("DDPMPipeline 10", "fp32")]
    assert all(r["img_s"] > 0 for r in report["sample"])
    assert "| 8 | + fused AdamW | bf16 autocast |" in (tmp_path / "bench.md").read_text()


def test_mfu_uses_the_given_peak(tmp_path):
    report = bench.main([*QUICK, "--peak-tflops", "1", "--out-dir", str(tmp_path)])
    for r in report["train"]:
        assert math.isclose(r["mfu"], 3 * report["flops_per_image_fwd"] * r["img_s"] / 1e12)


def test_a_configuration_out_of_memory_is_an_oom_row_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    events, real_adamw, real_sample, real_reset = [], torch.optim.AdamW, model.sample, torch._dynamo.reset

    def adamw(params, fused=None, **kw):  # the fp32 eager training step does not fit (as batch 32, 256 px on 80 GB)
        events.append("AdamW")
        if events.count("AdamW") == 1:  # the first configuration, fp32 eager
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 70.00 GiB")
        return real_adamw(params, fused=fused, **kw)

    def sample(unet, labels, sampler, *a, **kw):  # nor does the ddpm sampler: an older torch's plain RuntimeError
        if sampler == "ddpm":
            raise RuntimeError("CUDA error: out of memory")
        return real_sample(unet, labels, sampler, *a, **kw)
    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    monkeypatch.setattr(model, "sample", sample)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (events.append("reset"), real_reset()))
    report = bench.main([*QUICK, "--out-dir", str(tmp_path)])
    assert report == json.loads((tmp_path / "bench.json").read_text())
    eager, *faster = report["train"]
    assert eager == {"batch": 8, "config": "fp32 eager", "precision": "fp32", "error": "OOM"}
    assert all(r["img_s"] > 0 and "error" not in r for r in faster)
    assert [r.get("error") for r in report["sample"]] == [None, None, "OOM", None]
    assert all(r["img_s"] > 0 for r in report["sample"] if "error" not in r)
    assert all(i > 0 and events[i - 1] == "reset" for i, e in enumerate(events) if e == "AdamW")  # fresh compiles
    table = capsys.readouterr().out
    assert "| 8 | fp32 eager | fp32 | OOM | - | - | - | - |" in table
    faster = [line for line in table.splitlines() if line.startswith("| 8 | + ")]
    assert len(faster) == 3 and all(line.endswith("| - |") for line in faster)  # no ratio to a row that did not run
    assert "| ddpm 2 | fp32 | OOM | - |" in table and "| DDPMPipeline 2 | fp32 |" in table and "| x1.00 |" in table


def test_errors_other_than_out_of_memory_are_not_swallowed():
    def bug():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes"):
        bench.guarded(bug, torch.device("cpu"))
    assert bench.guarded(lambda: {"img_s": 1.0}, torch.device("cpu")) == {"img_s": 1.0}


def test_gpu_check_runs_whole_on_a_cpu_at_a_tiny_scale(tmp_path):
    """The GPU check, as a GPU runs it, on a CPU with --quick: tables with the targets, then prepare_data.py
    --demo, train.py and sample.py as subprocesses, a loss curve and a sample grid. These six files are all it
    writes."""
    report = bench.main(["--gpu-check", *QUICK, "--train-steps", "12", "--out-dir", str(tmp_path)])
    files = {"bench.json", "bench.md", "gpu_check.log", "metrics.csv", "loss_curve.png", "samples.png"}
    assert {p.name for p in tmp_path.iterdir()} == files
    assert [r["exit"] for r in report["loop"]["commands"]] == [0, 0, 0]
    assert all(math.isfinite(v) for v in report["loop"]["loss"] + report["loop"]["val_loss"])
    md = (tmp_path / "bench.md").read_text()
    assert "| MFU at batch 32, fastest row | - | >= 45% |" in md and "| img/s at batch 8, fastest row |" in md
    assert "`python train.py --data-dir $WORK/data --out-dir $WORK/run --preset tiny --batch-size 8 --max-steps 12" in md
    assert "wrote 24 synthetic images" in (tmp_path / "gpu_check.log").read_text()  # sample.py ran on the checkpoint
    grid, curve = Image.open(tmp_path / "samples.png"), Image.open(tmp_path / "loss_curve.png")
    assert grid.text["synthetic"] == "1" and grid.height == 6 * 32 and curve.size == (640, 360)
