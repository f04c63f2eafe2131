import json
import math

import pytest
import torch

import bench
import model

QUICK = ["--quick", "--device", "cpu", "--timed-steps", "1", "--png-images", "2", "--ddpm-steps", "2"]


def test_quick_bench_measures_every_part_and_writes_bench_json(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(["--quick", "--device", "cpu", "--steps", "2", "--png-images", "4", "--ddpm-steps", "10",
                         "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["preset"] == "tiny" and report["image_size"] == 32 and report["flops_per_image_fwd"] > 0
    d = report["data"]
    assert math.isclose(d["cache_over_png"], d["cache_img_s_per_worker"] / d["png_decode_img_s_per_worker"])
    # every row states its precision; on the CPU the fast path runs bf16 autocast (+ channels_last, fused AdamW)
    assert [(r["batch"], r["path"], r["precision"]) for r in report["train"]] == [
        (8, "fp32-eager", "fp32"), (8, "fast", "bf16 autocast")]
    for r in report["train"]:
        assert math.isclose(r["img_s"], 8 / (r["ms_per_step"] / 1e3))
        assert r["mfu"] is None  # no peak is known for a CPU unless --peak-tflops gives one
    assert [(r["sampler"], r["precision"]) for r in report["sample"]] == [
        ("ddim-2m 25, guidance 1.25", "bf16 autocast"), ("ddim-2m 25, no guidance", "bf16 autocast"),
        ("ddpm 10", "bf16 autocast"), ("DDPMPipeline 10", "fp32")]
    assert all(r["img_s"] > 0 for r in report["sample"])


def test_mfu_uses_the_given_peak(tmp_path):
    report = bench.main([*QUICK, "--peak-tflops", "1", "--out", str(tmp_path / "b.json")])
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
    out = tmp_path / "bench.json"
    report = bench.main([*QUICK, "--out", str(out)])
    assert report == json.loads(out.read_text())
    eager, fast = report["train"]
    assert eager == {"batch": 8, "path": "fp32-eager", "precision": "fp32", "error": "OOM"}
    assert fast["precision"] == "bf16 autocast" and fast["img_s"] > 0 and "error" not in fast
    assert [r.get("error") for r in report["sample"]] == [None, None, "OOM", None]
    assert all(r["img_s"] > 0 for r in report["sample"] if "error" not in r)
    assert all(i > 0 and events[i - 1] == "reset" for i, e in enumerate(events) if e == "AdamW")  # fresh compiles
    table = capsys.readouterr().out
    assert "train  | batch   8 fp32-eager fp32          | OOM" in table
    assert "fast / fp32-eager: -" in table  # no ratio against a row that did not run
    assert "ddpm 2                     bf16 autocast | OOM | - DDPMPipeline" in table
    assert "ddim-2m 25, guidance 1.25  bf16 autocast |" in table and "x1.00 DDPMPipeline" in table


def test_errors_other_than_out_of_memory_are_not_swallowed():
    def bug():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes"):
        bench.guarded(bug, torch.device("cpu"))
    assert bench.guarded(lambda: {"img_s": 1.0}, torch.device("cpu")) == {"img_s": 1.0}
