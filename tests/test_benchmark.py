"""instseg-benchmark (instseg/tools/benchmark_fps.py, wrapped by tools/benchmark_fps.py), the
core harness it calls (instseg.evaluation.timing) and the shared CLI helper, with a tiny
registered meta-architecture."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from instseg.config import setup_cfg
from instseg.data import DatasetCatalog, DatasetMapper, MetadataCatalog, read_image
from instseg.evaluation.timing import build_test_inputs
from instseg.modeling import META_ARCH_REGISTRY, MetaArchBase, boxes_from_masks, masks_to_original
from instseg.tools import benchmark_fps as tool
from instseg.utils.cli import default_argument_parser, register_cli_datasets

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128-seg"
ARCH = "_BenchmarkDummy"
RECORDER = "_BenchmarkRecorder"
TINY8 = "_benchmark_tiny8"
needs_data = pytest.mark.skipif(not (DATA / "images").is_dir(), reason=f"shared data not found: {DATA}")


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


class _BenchmarkRecorder(_BenchmarkDummy):
    """The dummy, keeping every input dict it is called with (in ``SEEN``)."""

    SEEN: list = []

    def forward(self, batched_inputs):
        type(self).SEEN.extend(batched_inputs)
        return super().forward(batched_inputs)


for _cls in (_BenchmarkDummy, _BenchmarkRecorder):
    if _cls.__name__ not in META_ARCH_REGISTRY:
        META_ARCH_REGISTRY.register(_cls)  # registered under the class name


@pytest.fixture
def tiny8_cleanup():
    """Unregister the dataset that a test registers through --dataset."""
    yield TINY8
    for catalog in (DatasetCatalog, MetadataCatalog):
        if TINY8 in catalog:
            catalog.remove(TINY8)


def test_benchmark_tool_synthetic(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = tool.run([
        "--num-iter", "3", "--num-warmup", "1", "--input-size", "64", "96", "--output", str(out),
        "MODEL.META_ARCHITECTURE", ARCH, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path),
        "INPUT.MIN_SIZE_TEST", "64",  # the test resize keeps 64 x 96
    ])
    printed = capsys.readouterr().out
    assert "MODEL.NUM_CLASSES = 80" in printed and "FPS:" in printed and "GFLOPs:" in printed
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["num_iter"] == 3 and saved["num_warmup"] == 1 and saved["fps"] > 0
    assert saved["input_size"] == [64, 96] and saved["test_resize"] == [64, 1333]
    assert saved["images"].startswith("3 synthetic random images of 64 x 96")
    assert saved["num_classes"] == 80
    assert saved["params"] == 3 * 80 * 16 + 80
    # flops_forward on the padded 64x96 batch: conv 3->80, 4x4 kernel, stride 4 -> 16x24 outputs
    assert saved["gflops"] * 1e9 == pytest.approx(3 * 80 * 16 * 16 * 24)
    assert saved["flops_counted"].startswith("network")
    assert saved["precision"] == "fp32" and saved["config_file"] == ""


def test_synthetic_images_go_through_the_test_resize():
    """--input-size is the synthetic image's original size; the model sees it test-resized."""
    cfg = setup_cfg("", ["INPUT.MIN_SIZE_TEST", "32", "INPUT.MAX_SIZE_TEST", "40"])
    inputs, desc = build_test_inputs(cfg, input_size=(64, 96), num_images=2)
    assert len(inputs) == 2 and desc.startswith("2 synthetic random images of 64 x 96")
    for x in inputs:
        assert x["image"].dtype == torch.uint8 and tuple(x["image"].shape) == (3, 27, 40)  # capped
        assert (x["height"], x["width"]) == (64, 96)
    assert not torch.equal(inputs[0]["image"], inputs[1]["image"])
    with pytest.raises(ValueError, match="input_size applies to synthetic"):
        build_test_inputs(cfg, images=["a.jpg"], input_size=(64, 96))


@needs_data
def test_timed_input_is_the_test_mapper_output(tmp_path):
    """What model([x]) receives while timed is exactly DatasetMapper(cfg, is_train=False)'s
    output for the file (antialiased resize), not an independent cv2 resize."""
    src = sorted((DATA / "images").glob("*.jpg"))[0]
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / src.name).symlink_to(src)
    overrides = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160"]
    _BenchmarkRecorder.SEEN.clear()
    assert tool.main(["--images", str(folder), "--num-iter", "2", "--num-warmup", "1", "--no-flops",
                      "MODEL.META_ARCHITECTURE", RECORDER, "MODEL.DEVICE", "cpu",
                      "OUTPUT_DIR", str(tmp_path)] + overrides) == 0  # an exit status for sys.exit
    seen = list(_BenchmarkRecorder.SEEN)
    assert len(seen) == 3  # 1 warm-up + 2 timed calls, one image

    expected = DatasetMapper(setup_cfg("", overrides), is_train=False)({"file_name": str(folder / src.name)})
    original = read_image(str(src))
    assert (expected["height"], expected["width"]) == original.shape[:2]
    assert max(expected["image"].shape[-2:]) == 160  # really resized (capped by MAX_SIZE_TEST)
    for x in seen:
        assert x["image"].dtype == torch.uint8 and torch.equal(x["image"], expected["image"])
        assert (x["height"], x["width"]) == (expected["height"], expected["width"])

    # the old tool's input (cv2.resize, bilinear without antialiasing) is a different image
    import cv2

    h, w = expected["image"].shape[-2:]
    old = torch.from_numpy(cv2.resize(original, (w, h), interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1)
    assert (old.int() - expected["image"].int()).abs().float().mean() > 1.0
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["input_size"] == [h, w] and saved["flops_error"] == "--no-flops"


@needs_data
def test_benchmark_tool_real_images_and_dataset_flag(tmp_path, capsys, tiny8_cleanup):
    json_file = str(DATA / "annotations_tiny8.json")
    tool.main([
        "--images", str(DATA / "images"), "--num-iter", "2", "--num-warmup", "0", "--bf16",
        "--dataset", TINY8, json_file, str(DATA / "images"),
        "MODEL.META_ARCHITECTURE", ARCH, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path),
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160",
    ])
    assert TINY8 in DatasetCatalog  # --dataset registered it
    assert f"MODEL.NUM_CLASSES = 80 (categories of --dataset {TINY8})" in capsys.readouterr().out
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["precision"] == "bf16" and saved["num_classes"] == 80
    h, w = saved["input_size"]
    assert min(h, w) <= 128 and max(h, w) <= 160
    assert "2 images from" in saved["images"]


@needs_data
def test_benchmark_tool_test_set(tmp_path, tiny8_cleanup):
    """--test-set times the first images of DATASETS.TEST[0], mapped as evaluation maps them."""
    _BenchmarkRecorder.SEEN.clear()
    overrides = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128"]
    tool.main([
        "--test-set", "--num-iter", "3", "--num-warmup", "0", "--no-flops",
        "--dataset", TINY8, str(DATA / "annotations_tiny8.json"), str(DATA / "images"),
        "MODEL.META_ARCHITECTURE", RECORDER, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path),
        "DATASETS.TEST", f"('{TINY8}',)"] + overrides)
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["images"] == f"3 images of dataset {TINY8}" and saved["num_classes"] == 80
    mapper = DatasetMapper(setup_cfg("", overrides), is_train=False)
    dicts = DatasetCatalog.get(TINY8)[:3]
    assert [x["file_name"] for x in _BenchmarkRecorder.SEEN] == [d["file_name"] for d in dicts]
    for x, d in zip(_BenchmarkRecorder.SEEN, dicts):
        assert torch.equal(x["image"], mapper(d)["image"])
    with pytest.raises(SystemExit):
        tool.main(["--test-set", "--input-size", "8", "8"])


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


def test_onnxruntime_backend_needs_an_onnx_file(tmp_path, capsys):
    """The argument checks come before onnxruntime is imported (CI has no export extra)."""
    base = ["--num-iter", "1", "MODEL.META_ARCHITECTURE", ARCH, "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        tool.run(["--backend", "onnxruntime"] + base)
    assert e.value.code == 2
    assert "--backend onnxruntime needs --onnx FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.run(["--backend", "onnxruntime", "--onnx", str(tmp_path / "missing.onnx")] + base)
    assert f"file not found: {tmp_path / 'missing.onnx'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.run(["--onnx", str(tmp_path / "m.onnx")] + base)  # --onnx with the default torch backend
    assert "--onnx is for --backend onnxruntime" in capsys.readouterr().err
    assert not (tmp_path / "benchmark.json").exists()


def test_onnxruntime_backend_without_onnxruntime_says_how_to_install(tmp_path, monkeypatch):
    import sys

    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install \.\[export\]"):
        tool.run(["--backend", "onnxruntime", "--onnx", str(model), "MODEL.META_ARCHITECTURE", ARCH,
                  "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path)])
