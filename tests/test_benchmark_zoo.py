"""instseg-benchmark-zoo (instseg/tools/benchmark_zoo.py, wrapped by tools/benchmark_zoo.py) and the
harness pieces it adds to instseg.evaluation.timing: the interleaved schedule, the
pre-processing / network / post-processing split, the statistics and the peak-memory probe."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from instseg.evaluation.timing import StageTimer, benchmark_interleaved, peak_memory_mb, summarize_times
from instseg.tools import benchmark_zoo as zoo

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "sparseinst" / "quickstart_R18.yaml")
SECOND = str(REPO / "configs" / "fassst" / "MNv2_416.yaml")
FAST = ["--threads", "1", "--num-images", "2", "--num-warmup", "1", "--input-size", "64", "96"]
SMALL = ["--", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "MODEL.DEVICE", "cpu"]


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class _FakeModel(nn.Module):
    """Data-contract stand-in whose three stages advance a fake clock by known amounts and that
    logs every call (so the test sees the real call order, not only the hook's)."""

    def __init__(self, name, clock, log, pre, net, post, with_inference=True):
        super().__init__()
        self.name, self.clock, self.log = name, clock, log
        self.pre, self.net, self.post = pre, net, post
        self.w = nn.Parameter(torch.zeros(1))
        if not with_inference:
            self.inference = None  # no callable inference: post-processing is not split off

    def preprocess_images(self, batched):
        self.clock.t += self.pre
        return batched, None

    def inference(self, outputs, batched):
        self.clock.t += self.post
        return [{"scores": torch.zeros(0)} for _ in batched]

    def forward(self, batched):
        self.log.append((self.name, int(batched[0]["i"])))
        images, _ = self.preprocess_images(batched)
        self.clock.t += self.net
        if callable(self.inference):
            return self.inference(None, images)
        self.clock.t += self.post
        return [{} for _ in batched]


def test_interleaved_schedule_is_round_robin_and_stages_are_split_exactly():
    clock, log, hook = _Clock(), [], []
    a = _FakeModel("a", clock, log, pre=0.001, net=0.006, post=0.003)
    b = _FakeModel("b", clock, log, pre=0.002, net=0.010, post=0.008)
    inputs_a = [{"i": i} for i in range(3)]
    inputs_b = [{"i": 10 + i} for i in range(2)]
    a.train()
    b.eval()
    res = benchmark_interleaved([(a, inputs_a), (b, inputs_b)], num_warmup=1, rounds=2, iters_per_round=2,
                                clock=clock, on_iteration=lambda *e: hook.append(e))
    # warm-up model by model, then round r: a twice, b twice; each model cycles through its own inputs
    assert log == [("a", 0), ("b", 10),
                   ("a", 0), ("a", 1), ("b", 10), ("b", 11),
                   ("a", 2), ("a", 0), ("b", 10), ("b", 11)]
    assert hook == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (0, 1, 0), (0, 1, 1), (1, 1, 0), (1, 1, 1)]
    ra, rb = res
    assert ra["num_iter"] == rb["num_iter"] == 4 and ra["num_warmup"] == 1
    assert ra["times_s"] == pytest.approx([0.010] * 4) and rb["times_s"] == pytest.approx([0.020] * 4)
    assert ra["preprocess_s"] == pytest.approx([0.001] * 4) and ra["postprocess_s"] == pytest.approx([0.003] * 4)
    assert ra["network_s"] == pytest.approx([0.006] * 4)
    assert ra["shares"] == pytest.approx({"preprocess": 0.1, "network": 0.6, "postprocess": 0.3})
    assert rb["shares"] == pytest.approx({"preprocess": 0.1, "network": 0.5, "postprocess": 0.4})
    assert ra["ms_median"] == pytest.approx(10.0) and rb["fps"] == pytest.approx(50.0)
    assert ra["instances"] == [0] * 4 and ra["mean_instances"] == 0  # len(output[0]["scores"])
    # the wrappers are gone and the training mode is back
    assert "inference" not in a.__dict__ and "preprocess_images" not in b.__dict__
    assert a.training and not b.training


def test_stage_split_without_an_inference_method_gives_the_network_the_rest():
    clock, log = _Clock(), []
    m = _FakeModel("m", clock, log, pre=0.002, net=0.005, post=0.003, with_inference=False)
    (r,) = benchmark_interleaved([(m, [{"i": 0}])], num_warmup=0, rounds=1, iters_per_round=2, clock=clock)
    assert r["shares"]["postprocess"] is None and r["postprocess_s"] == [None, None]
    assert r["network_s"] == pytest.approx([0.008, 0.008]) and r["shares"]["preprocess"] == pytest.approx(0.2)
    assert r["mean_instances"] is None  # no "scores" in the output
    with pytest.raises(RuntimeError, match="entered"):
        StageTimer(m, clock=clock).call({"i": 0})


def test_interleaved_rejects_bad_arguments():
    m = _FakeModel("m", _Clock(), [], 0, 0, 0)
    with pytest.raises(ValueError, match="no models"):
        benchmark_interleaved([])
    with pytest.raises(ValueError, match="inputs"):
        benchmark_interleaved([(m, [])])
    with pytest.raises(ValueError, match="rounds"):
        benchmark_interleaved([(m, [{"i": 0}])], rounds=0)
    with pytest.raises(ValueError, match="precision"):
        benchmark_interleaved([(m, [{"i": 0}])], precision="int8")


def test_summarize_times_median_p90_fps():
    s = summarize_times([i / 1000 for i in range(1, 11)])  # 1 .. 10 ms
    assert s["ms_median"] == pytest.approx(5.5) and s["ms_p90"] == pytest.approx(9.1)  # linear interpolation
    assert s["ms_mean"] == pytest.approx(5.5) and s["fps"] == pytest.approx(1000 / 5.5)
    assert summarize_times([0.002])["ms_std"] == 0.0
    with pytest.raises(ValueError):
        summarize_times([])


def test_peak_memory_counts_what_a_call_makes_resident():
    def touch_64_mib():
        t = torch.ones(64 * 2**20, dtype=torch.uint8)  # written, so resident
        return int(t[-1])

    mib = peak_memory_mb(touch_64_mib, "cpu")
    if mib is None:
        pytest.skip("peak RSS not measurable here (needs Linux /proc/self/clear_refs and glibc)")
    assert 60 <= mib < 64 + 48


def test_metrics_json_forms(tmp_path):
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"val": {"segm": {"AP": 12.5}, "bbox": {"AP": 1.0}}}))
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"segm": {"AP": 7.25}}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"val": {"bbox": {"AP": 3.0}}}))
    assert zoo.mask_ap_from_metrics(str(keyed)) == 12.5 and zoo.mask_ap_from_metrics(str(flat)) == 7.25
    with pytest.raises(KeyError, match="segm"):
        zoo.mask_ap_from_metrics(str(bad))
    with pytest.raises(FileNotFoundError):
        zoo.mask_ap_from_metrics(str(tmp_path / "none.json"))


def test_the_published_data_file():
    """configs/zoo_published.json: every config exists, the defaults are the four default
    configs, every number names its source, and the other models' series name their hardware."""
    data = zoo.load_published(str(REPO / "configs" / zoo.PUBLISHED_FILE))
    for e in data["configs"]:
        assert (REPO / "configs" / e["config"]).is_file(), e["config"]
        assert e["source"] and e["split"] in ("val2017", "test-dev") and 0 < e["mask_ap"] < 100
    defaults = zoo.select_configs(data, "default", REPO / "configs")
    assert [Path(f).relative_to(REPO / "configs").as_posix() for f in defaults] == [
        "sparseinst/R50_giam.yaml", "fastinst/R50_D3_640.yaml", "fassst/MNv2_416.yaml",
        "queryinst/R50_FPN_100q_1x.yaml"]
    assert len(zoo.select_configs(data, "paper_row", REPO / "configs")) > len(defaults)
    assert zoo.published_entry(data, str(REPO / "configs/fassst/MNv2_416.yaml"))["mask_ap"] == 34.2
    assert zoo.published_entry(data, TINY) is None
    for series in data["reference_series"]:
        assert "not this CPU" in series["series"] and series["source"]
        assert series["points"] and all(p["ms"] > 0 and 0 < p["mask_ap"] < 100 for p in series["points"])


def test_zoo_tool_on_two_tiny_configs(tmp_path, capsys):
    """Two configs at a 64-pixel test size: table, CSV and plot written with one row per config,
    round-robin schedule, stage shares summing to 1, the metrics.json AP for the first config and
    the published AP (marked) for the second."""
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"val": {"segm": {"AP": 12.5}}}))
    published = tmp_path / "published.json"
    published.write_text(json.dumps({"configs": [
        {"config": "sparseinst/quickstart_R18.yaml", "name": "tiny A", "mask_ap": 99.0, "split": "val2017",
         "source": "test"},
        {"config": "fassst/MNv2_416.yaml", "name": "tiny B", "mask_ap": 21.5, "split": "test-dev", "source": "test"}],
        "reference_series": [{"series": "published, elsewhere (not this CPU)", "source": "test",
                              "points": [{"name": "other", "mask_ap": 30.0, "ms": 2.0}]}]}))
    order = []
    out = tmp_path / "zoo"
    report = zoo.run(FAST + ["--rounds", "2", "--iters-per-round", "1", "--published", str(published),
                             "--output", str(out), "--config-files", TINY, SECOND,
                             "--metrics", str(metrics), "-"] + SMALL,
                     on_iteration=lambda *e: order.append(e))
    printed = capsys.readouterr().out
    assert "torch threads 1" in printed and "| tiny A |" in printed and "| tiny B |" in printed
    assert order == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]

    with open(out / "zoo.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == zoo.TABLE_COLUMNS
    assert [r["model"] for r in rows] == ["tiny A", "tiny B"]
    assert [r["config"] for r in rows] == [Path(TINY).relative_to(REPO / "configs").as_posix(),
                                           Path(SECOND).relative_to(REPO / "configs").as_posix()]
    a, b = rows
    assert float(a["mask_ap"]) == 12.5 and a["ap_source"] == f"measured ({metrics})"
    assert float(b["mask_ap"]) == 21.5 and b["ap_source"].startswith("published (test-dev")
    for r in rows:
        shares = [float(r[k]) for k in ("pre_share", "net_share", "post_share")]
        assert sum(shares) == pytest.approx(1.0, abs=1e-6) and all(0 <= s <= 1 for s in shares)
        assert shares[0] > 0 and shares[2] > 0  # preprocess_images and inference were both timed
        assert float(r["ms_p90"]) >= float(r["ms_median"]) > 0 and r["weights"] == "random"
        assert float(r["params_m"]) > 0 and float(r["gflops"]) > 0
        assert r["input"].startswith("64 x 96") and 0 <= float(r["mean_instances"]) <= 100
    md = (out / "zoo.md").read_text()
    assert md.count("\n| tiny ") == 2 and "measured (" in md and "published (" in md and "1 threads" in md
    png = out / "speed_accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[:2] == (640, 850)
    assert json.loads((out / "zoo.json").read_text())["rows"][0]["num_iter"] == 2
    assert report["rows"][1]["ap_measured"] is False and report["scaling"] is None


def test_zoo_scaling_sweeps(tmp_path):
    out = tmp_path / "scaling"
    report = zoo.run(FAST + ["--rounds", "1", "--iters-per-round", "1", "--output", str(out), "--scaling",
                             "--config-files", TINY, "--sizes", "48", "64", "--detections", "1", "3"] + SMALL)
    with open(out / "scaling.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == zoo.SCALING_COLUMNS and len(rows) == 4 == len(report["scaling"])
    assert [(r["sweep"], r["short_side"], r["max_size"], r["detections"]) for r in rows] == [
        ("short_side", "48", "72", "100"), ("short_side", "64", "96", "100"),
        ("detections", "64", "96", "1"), ("detections", "64", "96", "3")]
    assert [r["input"] for r in rows] == ["48 x 72", "64 x 96", "64 x 96", "64 x 96"]
    for r in rows:
        assert float(r["ms_median"]) > 0
        assert float(r["mean_instances"]) <= int(r["detections"])  # TEST.DETECTIONS_PER_IMAGE took effect
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_misaligned_metrics_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        zoo.run(["--config-files", TINY, SECOND, "--metrics", "a.json"])
    assert e.value.code == 2 and "2 configs" in capsys.readouterr().err


def test_zoo_variants_are_rows_of_the_same_weights_in_one_interleaved_run(tmp_path, monkeypatch):
    """--variants fp32 channels_last bf16: one row per (config, variant), all interleaved in one run;
    the copies carry the same weights, channels_last converts the copy's 4-D weights, bf16 runs
    under CPU autocast."""
    from instseg.evaluation import timing

    seen = {}
    real = timing.benchmark_interleaved

    def spy(entries, **kw):
        seen["entries"], seen["precision"] = entries, kw["precision"]
        return real(entries, **kw)

    monkeypatch.setattr(timing, "benchmark_interleaved", spy)
    order = []
    report = zoo.run(FAST + ["--rounds", "1", "--iters-per-round", "1", "--output", str(tmp_path / "zoo"),
                             "--config-files", TINY, "--variants", "fp32", "channels_last", "bf16"] + SMALL,
                     on_iteration=lambda *e: order.append(e))
    assert [r["variant"] for r in report["rows"]] == ["fp32", "channels_last", "bf16"]
    assert all(r["model"].endswith(f"[{r['variant']}]") for r in report["rows"])
    assert order == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    assert seen["precision"] == ["fp32", "fp32", "bf16"]
    (m0, _), (m1, _), (m2, _) = seen["entries"]
    assert m1 is not m0 and m2 is not m0
    w0, w1, w2 = (dict(m.state_dict()) for m in (m0, m1, m2))
    assert all(torch.equal(w0[k], w1[k]) and torch.equal(w0[k], w2[k]) for k in w0)
    conv = next(k for k, v in w1.items() if v.dim() == 4 and v.shape[-1] > 1)
    assert w1[conv].is_contiguous(memory_format=torch.channels_last) and not w1[conv].is_contiguous()
    assert w0[conv].is_contiguous()


def test_zoo_random_weights_are_seeded():
    """Random-weight timings depend on how many instances pass the thresholds: two builds of one
    config must draw the same weights (SEED, else 0), and another SEED other ones."""
    cfg, _ = zoo._cfg_for(TINY, SMALL[1:])
    a, b = zoo._build(cfg).state_dict(), zoo._build(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg.defrost()
    cfg.SEED = 7
    c = zoo._build(cfg).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
