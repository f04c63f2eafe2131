import json
import math

import bench


def test_quick_bench_measures_every_part_and_writes_bench_json(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(["--quick", "--device", "cpu", "--steps", "2", "--png-images", "4", "--ddpm-steps", "10",
                         "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["preset"] == "tiny" and report["image_size"] == 32 and report["flops_per_image_fwd"] > 0
    d = report["data"]
    assert math.isclose(d["cache_over_png"], d["cache_img_s_per_worker"] / d["png_decode_img_s_per_worker"])
    assert [(r["batch"], r["path"]) for r in report["train"]] == [(8, "fp32-eager"), (8, "fast")]
    for r in report["train"]:
        assert math.isclose(r["img_s"], 8 / (r["ms_per_step"] / 1e3))
        assert r["mfu"] is None  # no peak is known for a CPU unless --peak-tflops gives one
    assert set(report["sample_img_s"]) == {"dpm++ 25, guidance 2", "dpm++ 25, no guidance", "ddpm 10",
                                           "DDPMPipeline 10 fp32"}
    assert all(v > 0 for v in report["sample_img_s"].values())


def test_mfu_uses_the_given_peak(tmp_path):
    report = bench.main(["--quick", "--device", "cpu", "--steps", "1", "--png-images", "2", "--ddpm-steps", "2",
                         "--peak-tflops", "1", "--out", str(tmp_path / "b.json")])
    for r in report["train"]:
        assert math.isclose(r["mfu"], 3 * report["flops_per_image_fwd"] * r["img_s"] / 1e12)
