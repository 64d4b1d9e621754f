"""ONNX export of the network (instseg/export.py, instseg/tools/export_model.py): ONNX Runtime
against PyTorch on real coco128-seg images for SparseInst and FastInst, the Python
post-processing of the ONNX outputs against the model's full forward, and the CLI's exit status.
Skipped without the ``export`` extra (onnx, onnxruntime) or without ../shared data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from instseg.export import (_StaticAdaptiveAvgPool2d, export_onnx, finish_postprocess,  # noqa: E402
                            prepare_input, run_onnx, verify_onnx)

REPO = Path(__file__).resolve().parents[1]
IMAGES = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg"]  # 640x480, 640x426, 640x428
SIZE = (256, 352)  # each image resized by the test mapper (256 / 352) fits and pads to exactly this
OPTS = ["MODEL.RESNETS.NORM", "BN", "INPUT.MIN_SIZE_TEST", "256", "INPUT.MAX_SIZE_TEST", "352",
        "MODEL.DEVICE", "cpu", "SEED", "0"]
MODELS = {
    "sparseinst": str(REPO / "configs" / "sparseinst" / "R50_giam.yaml"),
    "fastinst": str(REPO / "configs" / "fastinst" / "R50_D1_576.yaml"),
}
ATOL, RTOL = 1e-3, 1e-3  # the CLI's default tolerance: max abs diff <= ATOL + RTOL * max|output|


@pytest.fixture(scope="module")
def images(coco128_three_images) -> list:
    return coco128_three_images


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, images, tmp_path_factory):
    """(predictor, onnx path, output names, graph inputs, (h, w) inside them, model input dicts)."""
    from instseg.engine import Predictor

    predictor = Predictor.from_config_file(MODELS[request.param], OPTS, weights="", allow_random=True)
    path = tmp_path_factory.mktemp(f"onnx_{request.param}") / "model.onnx"
    names = export_onnx(predictor.model, str(path), input_size=SIZE)
    inputs = [predictor.preprocess(str(f)) for f in images]
    prepared = [prepare_input(x["image"], SIZE, predictor.cfg.MODEL.PIXEL_MEAN) for x in inputs]
    return predictor, path, names, [a for a, _ in prepared], [hw for _, hw in prepared], inputs


def test_static_adaptive_pool_equals_pytorch_on_non_divisible_bins():
    x = torch.randn(2, 4, 8, 11)
    for size in (1, 2, 3, 6, (2, 5)):
        assert torch.allclose(_StaticAdaptiveAvgPool2d(size)(x), torch.nn.AdaptiveAvgPool2d(size)(x), atol=1e-6)


def test_prepare_input_pads_with_the_mean_and_scales_down_to_fit():
    mean = (10.0, 20.0, 30.0)
    img = torch.full((3, 40, 50), 200, dtype=torch.uint8)
    arr, hw = prepare_input(img, (64, 64), mean)
    assert arr.shape == (1, 3, 64, 64) and arr.dtype == np.float32 and hw == (40, 50)
    assert (arr[0, :, :40, :50] == 200).all()
    assert (arr[0, 1, 40:, :] == 20).all() and (arr[0, 2, :, 50:] == 30).all()
    arr, hw = prepare_input(torch.zeros((3, 100, 50), dtype=torch.uint8), (64, 64), mean)
    assert hw == (64, 32) and arr.shape == (1, 3, 64, 64)  # aspect kept, bottom/right padded
    arr, hw = prepare_input(torch.zeros((3, 33, 65), dtype=torch.uint8), None, mean, 32)
    assert arr.shape == (1, 3, 64, 96) and hw == (33, 65)


def test_onnx_runtime_matches_pytorch(exported):
    predictor, path, names, arrays, _, _ = exported
    assert names[:2] == ["pred_logits", "pred_masks"]
    result = verify_onnx(str(path), predictor.model, arrays)
    for name in names:
        r = result[name]
        assert r["max_abs"] <= ATOL + RTOL * r["max_ref"], (name, r)
        assert r["max_ref"] > 0
    assert result["mask_iou"]["min"] >= 0.99
    # the check sees a different network: another initialization is far off
    from instseg.modeling import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        other = build_model(predictor.cfg).eval()
    bad = verify_onnx(str(path), other, arrays[:1])
    assert any(bad[n]["max_abs"] > ATOL + RTOL * bad[n]["max_ref"] for n in names)


def test_finish_postprocess_equals_the_full_forward(exported):
    predictor, path, names, arrays, sizes, inputs = exported
    for arr, hw, x in zip(arrays, sizes, inputs):
        assert hw == tuple(x["image"].shape[-2:])
        got = finish_postprocess(predictor.model, run_onnx(str(path), arr), [hw], SIZE,
                                 [(x["height"], x["width"])])[0]
        with torch.no_grad():
            ref = predictor.model([x])[0]  # pads to 256 x 352 itself
        assert got["masks"].shape[1:] == (x["height"], x["width"]) == ref["masks"].shape[1:]
        assert torch.equal(got["labels"], ref["labels"])
        assert torch.allclose(got["scores"], ref["scores"], atol=1e-3, rtol=1e-3)
        assert got["masks"].shape[0] > 0
        for a, b in zip(got["masks"], ref["masks"]):
            union = (a | b).sum().item()
            assert union == 0 or (a & b).sum().item() / union >= 0.99


def test_cli_passes_and_fails_on_a_zero_tolerance(images, tmp_path, capsys):
    from instseg.tools.export_model import main

    base = ["--format", "onnx", "--config-file", MODELS["sparseinst"], "--output", str(tmp_path / "m.onnx"),
            "--input-size", *map(str, SIZE), "--random-weights", "--images", *map(str, images)]
    assert main(base + OPTS) == 0
    out = capsys.readouterr().out
    assert "pred_masks" in out and "mask IoU" in out and "PASS" in out and (tmp_path / "m.onnx").is_file()
    assert main(base + ["--atol", "0", "--rtol", "0"] + OPTS) == 1
    assert "FAIL" in capsys.readouterr().out


def test_dynamic_export_of_a_pyramid_pooling_model_is_refused(tmp_path):
    from instseg.engine import Predictor

    predictor = Predictor.from_config_file(MODELS["sparseinst"], OPTS, weights="", allow_random=True)
    with pytest.raises(ValueError, match="fixed input_size"):
        export_onnx(predictor.model, str(tmp_path / "d.onnx"), input_size=SIZE, dynamic=True)
    with pytest.raises(ValueError, match="SIZE_DIVISIBILITY"):
        export_onnx(predictor.model, str(tmp_path / "d.onnx"), input_size=(250, 352))


def test_benchmark_onnxruntime_backend(images, tmp_path, capsys):
    """instseg-benchmark --backend onnxruntime: the exported file timed through the harness, with
    the same test inputs, and the wrapper gives the model's own results."""
    import json

    from instseg.engine import Predictor
    from instseg.export import OnnxRuntimeModel
    from instseg.tools import benchmark_fps

    predictor = Predictor.from_config_file(MODELS["sparseinst"], OPTS, weights="", allow_random=True)
    path = tmp_path / "m.onnx"
    export_onnx(predictor.model, str(path), input_size=SIZE)
    out = tmp_path / "bench.json"
    argv = ["--backend", "onnxruntime", "--onnx", str(path), "--config-file", MODELS["sparseinst"],
            "--images", str(images[0].parent), "--num-iter", "3", "--num-warmup", "1", "--no-flops",
            "--output", str(out)]
    report = benchmark_fps.run(argv + OPTS + ["OUTPUT_DIR", str(tmp_path)])
    printed = capsys.readouterr().out
    assert f"{torch.get_num_threads()} intra-op threads" in printed and "backend:       onnxruntime" in printed
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["backend"] == "onnxruntime" and saved["onnx"] == str(path)
    assert saved["onnx_input_size"] == list(SIZE) and saved["ort_threads"] == torch.get_num_threads()
    assert saved["num_iter"] == 3 and saved["num_warmup"] == 1 and saved["fps"] > 0 and saved["ms_median"] > 0
    assert saved["images"] == f"3 images from {images[0].parent}" and saved["weights"] == ""
    assert saved["meta_architecture"] == "SparseInst" and saved["precision"] == "fp32"
    h, w = saved["input_size"]
    assert h <= SIZE[0] and w <= SIZE[1] and "threads" in saved["device"]

    # the timed callable returns what the PyTorch model returns for the same input
    x = predictor.preprocess(str(images[0]))
    got = OnnxRuntimeModel(str(path), predictor.model)([x])[0]
    with torch.no_grad():
        ref = predictor.model([x])[0]
    assert got["masks"].shape == ref["masks"].shape and got["masks"].shape[1:] == (x["height"], x["width"])
    assert torch.equal(got["labels"], ref["labels"])

    # a graph smaller than the resized test images is refused, naming the sizes
    with pytest.raises(ValueError, match=r"input size 256x352 is smaller than the resized test image"):
        benchmark_fps.run(argv + OPTS + ["OUTPUT_DIR", str(tmp_path), "INPUT.MIN_SIZE_TEST", "320",
                                         "INPUT.MAX_SIZE_TEST", "480"])
