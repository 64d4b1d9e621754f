"""tools/benchmark_fps.py and the shared CLI helper, with a tiny registered meta-architecture."""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from instseg.modeling import META_ARCH_REGISTRY, MetaArchBase, boxes_from_masks, masks_to_original
from instseg.utils.cli import default_argument_parser, register_cli_datasets

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128-seg"
ARCH = "_BenchmarkDummy"


class _BenchmarkDummy(MetaArchBase):
    """Data-contract model: stride-4 conv to NUM_CLASSES mask logits, one instance per class."""

    def __init__(self, cfg):
        super().__init__(cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.MODEL.SIZE_DIVISIBILITY)
        self.num_classes = cfg.MODEL.NUM_CLASSES
        self.net = nn.Conv2d(3, self.num_classes, 4, stride=4)

    def flops_forward(self, images):
        return self.net(images)

    def forward(self, batched_inputs):
        images, sizes = self.preprocess_images(batched_inputs)
        logits = self.net(images)
        outs = []
        for i, x in enumerate(batched_inputs):
            m = masks_to_original(logits[i], tuple(images.shape[-2:]), sizes[i], (x["height"], x["width"]))
            masks = m > 0
            outs.append({"scores": m.flatten(1).sigmoid().mean(1),
                         "labels": torch.arange(self.num_classes), "masks": masks,
                         "boxes": boxes_from_masks(masks)})
        return outs


if ARCH not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(_BenchmarkDummy)  # registered under the class name


def _load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_fps", REPO / "tools" / "benchmark_fps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tool():
    return _load_tool()


def test_shortest_edge_rule(tool):
    assert tool.shortest_edge_size(480, 640, 640, 853) == (640, 853)
    assert tool.shortest_edge_size(427, 640, 640, 853) == (569, 853)  # capped by max size
    assert tool.shortest_edge_size(640, 480, 800, 1333) == (1067, 800)
    assert tool.shortest_edge_size(100, 200, 50, 0) == (50, 100)


def test_benchmark_tool_synthetic(tool, tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = tool.main([
        "--num-iter", "3", "--num-warmup", "1", "--input-size", "64", "96", "--output", str(out),
        "MODEL.META_ARCHITECTURE", ARCH, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path),
    ])
    printed = capsys.readouterr().out
    assert "MODEL.NUM_CLASSES = 80" in printed and "FPS:" in printed and "GFLOPs:" in printed
    saved = json.loads(out.read_text())
    assert saved["num_iter"] == 3 and saved["num_warmup"] == 1 and saved["fps"] > 0
    assert saved["input_size"] == [64, 96]
    assert saved["num_classes"] == 80
    assert saved["params"] == 3 * 80 * 16 + 80
    # flops_forward on the padded 64x96 batch: conv 3->80, 4x4 kernel, stride 4 -> 16x24 outputs
    assert saved["gflops"] * 1e9 == pytest.approx(3 * 80 * 16 * 16 * 24)
    assert saved["flops_counted"].startswith("network")
    assert report["precision"] == "fp32"


@pytest.mark.skipif(not (DATA / "images").is_dir(), reason="shared data not found")
def test_benchmark_tool_real_images_and_dataset_flag(tool, tmp_path, monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("instseg.data")
    fake.register_coco_instances = lambda name, json_file, root: calls.append((name, json_file, root))
    monkeypatch.setitem(sys.modules, "instseg.data", fake)
    json_file = str(DATA / "annotations_tiny8.json")
    tool.main([
        "--images", str(DATA / "images"), "--num-iter", "2", "--num-warmup", "0", "--bf16",
        "--dataset", "tiny8", json_file, str(DATA / "images"),
        "MODEL.META_ARCHITECTURE", ARCH, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path),
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160",
    ])
    assert calls == [("tiny8", json_file, str(DATA / "images"))]
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["precision"] == "bf16" and saved["num_classes"] == 80
    h, w = saved["input_size"]
    assert min(h, w) <= 128 and max(h, w) <= 160
    assert "2 images from" in saved["images"]


def test_default_argument_parser():
    p = default_argument_parser("x")
    a = p.parse_args(["--config-file", "c.yaml", "--dataset", "a", "a.json", "imgs",
                      "--dataset", "b", "b.json", "imgs2", "--num-gpus", "2", "--eval-only",
                      "SOLVER.MAX_ITER", "10"])
    assert a.config_file == "c.yaml" and a.num_gpus == 2 and a.eval_only and not a.resume
    assert a.dataset == [["a", "a.json", "imgs"], ["b", "b.json", "imgs2"]]
    assert a.opts == ["SOLVER.MAX_ITER", "10"]
    assert a.num_machines == 1 and a.machine_rank == 0 and a.dist_url.startswith("tcp://")
    assert register_cli_datasets(p.parse_args([])) == []
    with pytest.raises(FileNotFoundError):
        register_cli_datasets(p.parse_args(["--dataset", "a", "/nonexistent.json", "/nope"]))
