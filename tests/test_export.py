"""ONNX export (instseg/export.py, instseg/tools/export_model.py): ONNX Runtime against PyTorch
on real coco128-seg images for all four models (SparseInst / FastInst at 256 x 352, FASSST /
QueryInst at 128 x 160), the Python post-processing of the ONNX outputs against the model's full
forward, dynamic height / width, onnxslim simplification and the CLI's exit status. Skipped
without the ``export`` extra (onnx, onnxruntime) or without ../shared data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from instseg.export import (_StaticAdaptiveAvgPool2d, adaptive_avg_pool2d_as_slices, export_onnx,  # noqa: E402
                            finish_postprocess, prepare_input, run_onnx, verify_onnx)

REPO = Path(__file__).resolve().parents[1]
IMAGES = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg"]  # 640x480, 640x426, 640x428
SIZE = (256, 352)  # each image resized by the test mapper (256 / 352) fits and pads to exactly this
OPTS = ["MODEL.RESNETS.NORM", "BN", "INPUT.MIN_SIZE_TEST", "256", "INPUT.MAX_SIZE_TEST", "352",
        "MODEL.DEVICE", "cpu", "SEED", "0"]
MODELS = {
    "sparseinst": str(REPO / "configs" / "sparseinst" / "R50_giam.yaml"),
    "fastinst": str(REPO / "configs" / "fastinst" / "R50_D1_576.yaml"),
    "fassst": str(REPO / "configs" / "fassst" / "MNv2_416.yaml"),
    "queryinst": str(REPO / "configs" / "queryinst" / "R50_FPN_100q_1x.yaml"),
}
SMALL = (128, 160)  # FASSST / QueryInst: the test mapper gives 120 x 160 and 107 x 160, padded to this
SMALL_OPTS = ["MODEL.RESNETS.NORM", "BN", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160",
              "MODEL.DEVICE", "cpu", "SEED", "0",
              # random slot scores are ~0.01 (the prior): keep every slot instead of none
              "MODEL.FASSST.SCORE_THRESHOLD", "0.0",
              # 2 of the 6 stages keep the test fast; random box deltas otherwise grow the boxes to 1e5 px
              "MODEL.QUERY_INST.NUM_STAGES", "2"]
SETUP = {  # model -> (input size, config overrides, graph outputs)
    "sparseinst": (SIZE, OPTS, ["pred_logits", "pred_masks", "pred_scores"]),
    "fastinst": (SIZE, OPTS, ["pred_logits", "pred_masks"]),
    "fassst": (SMALL, SMALL_OPTS, ["scores", "labels", "boxes", "pred_masks"]),
    "queryinst": (SMALL, SMALL_OPTS, ["scores", "boxes", "pred_masks"]),
}
ATOL, RTOL = 1e-3, 1e-3  # the CLI's default tolerance: max abs diff <= ATOL + RTOL * max|output|


def _predictor(name: str, opts=None):
    """A random-weight Predictor; FASSST's mask-tail predictor x1000 (its std-0.001 init gives
    |logits| ~1e-5, so every final mask pixel would be a float32 tie at 0.5)."""
    from instseg.engine import Predictor

    predictor = Predictor.from_config_file(MODELS[name], SETUP[name][1] if opts is None else opts, weights="",
                                           allow_random=True)
    tail = getattr(predictor.model, "mask_tail", None)
    if tail is not None:
        with torch.no_grad():
            (tail.predictor if tail.predictor is not None else tail.deconv).weight.mul_(1000.0)
    return predictor


@pytest.fixture(scope="module")
def images(coco128_three_images) -> list:
    return coco128_three_images


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, images, tmp_path_factory):
    """(predictor, onnx path, output names, graph inputs, (h, w) inside them, model input dicts, model name)."""
    size = SETUP[request.param][0]
    predictor = _predictor(request.param)
    path = tmp_path_factory.mktemp(f"onnx_{request.param}") / "model.onnx"
    names = export_onnx(predictor.model, str(path), input_size=size)
    inputs = [predictor.preprocess(str(f)) for f in images]
    prepared = [prepare_input(x["image"], size, predictor.cfg.MODEL.PIXEL_MEAN) for x in inputs]
    return predictor, path, names, [a for a, _ in prepared], [hw for _, hw in prepared], inputs, request.param


def test_static_adaptive_pool_equals_pytorch_on_non_divisible_bins():
    x = torch.randn(2, 4, 8, 11)
    for size in (1, 2, 3, 6, (2, 5), (None, 4)):
        assert torch.allclose(_StaticAdaptiveAvgPool2d(size)(x), torch.nn.AdaptiveAvgPool2d(size)(x), atol=1e-6)
    # more bins than pixels (a 6-bin pooling of a 4 x 5 map): PyTorch's overlapping bins
    y = torch.randn(1, 2, 4, 5)
    assert torch.allclose(adaptive_avg_pool2d_as_slices(y, 6), torch.nn.functional.adaptive_avg_pool2d(y, 6), atol=1e-6)


def test_dynamic_adaptive_pool_bounds_follow_the_input_size(tmp_path):
    """Traced once at 13 x 11, the slice bounds are functions of the shape: right at other sizes."""
    class Pool(torch.nn.Module):
        def forward(self, x):
            return adaptive_avg_pool2d_as_slices(x, (6, 3))

    path = tmp_path / "pool.onnx"
    torch.onnx.export(Pool(), (torch.randn(1, 2, 13, 11),), str(path), input_names=["x"], dynamo=False,
                      dynamic_axes={"x": {2: "h", 3: "w"}}, opset_version=17)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for h, w in ((13, 11), (8, 20), (27, 17)):
        x = torch.randn(1, 2, h, w)
        got = sess.run(None, {"x": x.numpy()})[0]
        assert np.allclose(got, torch.nn.functional.adaptive_avg_pool2d(x, (6, 3)).numpy(), atol=1e-5), (h, w)


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
    predictor, path, names, arrays, sizes, _, name_ = exported
    assert names == SETUP[name_][2]
    result = verify_onnx(str(path), predictor.model, arrays, image_sizes=sizes)
    for name in names:
        r = result[name]
        assert r["max_abs"] <= ATOL + RTOL * r["max_ref"], (name, r)
        assert r["max_ref"] > 0 or name == "labels"
    assert result["mask_iou"]["min"] >= 0.99
    fin = result["final"]
    assert fin["instances"] > 0 and fin["unmatched"] == 0 and fin["count_mismatch"] == 0
    assert fin["mask_iou_min"] >= 0.99 and fin["max_score_diff"] < 1e-3
    assert 0.5 < fin["instance_mask_iou_min"] <= fin["mask_iou_min"]  # pooled per image >= its worst instance
    # the check sees a different network: another initialization is far off
    from instseg.modeling import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        other = build_model(predictor.cfg).eval()
    bad = verify_onnx(str(path), other, arrays[:1], image_sizes=sizes[:1])
    assert any(bad[n]["max_abs"] > ATOL + RTOL * bad[n]["max_ref"] for n in names)


def test_finish_postprocess_equals_the_full_forward(exported):
    predictor, path, names, arrays, sizes, inputs, name_ = exported
    for arr, hw, x in zip(arrays, sizes, inputs):
        assert hw == tuple(x["image"].shape[-2:])
        got = finish_postprocess(predictor.model, run_onnx(str(path), arr, image_size=hw), [hw], SETUP[name_][0],
                                 [(x["height"], x["width"])])[0]
        with torch.no_grad():
            ref = predictor.model([x])[0]  # pads to the graph's input size itself
        assert got["masks"].shape[1:] == (x["height"], x["width"]) == ref["masks"].shape[1:]
        assert torch.equal(got["labels"], ref["labels"])
        assert torch.allclose(got["scores"], ref["scores"], atol=1e-3, rtol=1e-3)
        assert got["masks"].shape[0] > 0
        assert torch.allclose(got["boxes"], ref["boxes"], atol=1e-2)
        # IoU over all the image's masks (a single 79-pixel mask may differ by one pixel)
        union = (got["masks"] | ref["masks"]).sum().item()
        assert union == 0 or (got["masks"] & ref["masks"]).sum().item() / union >= 0.99


def test_cli_passes_and_fails_on_a_zero_tolerance(images, tmp_path, capsys):
    from instseg.tools.export_model import main

    base = ["--format", "onnx", "--config-file", MODELS["sparseinst"], "--output", str(tmp_path / "m.onnx"),
            "--input-size", *map(str, SIZE), "--random-weights", "--images", *map(str, images)]
    assert main(base + OPTS) == 0
    out = capsys.readouterr().out
    assert "pred_masks" in out and "mask IoU" in out and "PASS" in out and (tmp_path / "m.onnx").is_file()
    assert main(base + ["--atol", "0", "--rtol", "0"] + OPTS) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["sparseinst", "fassst"])
def test_dynamic_export_runs_at_other_sizes(name, images, tmp_path):
    """One dynamic graph (traced at 256 x 352 / 128 x 160), run at each image's own padded size for
    two test resolutions: equal to PyTorch, and the final results equal the model's own forward."""
    import onnx

    base = SETUP[name][1]
    predictor = _predictor(name)
    path = tmp_path / "d.onnx"
    export_onnx(predictor.model, str(path), input_size=SETUP[name][0], dynamic=True)
    shape = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in shape[2:]] == ["height", "width"]
    seen = set()
    for short, long in (("96", "128"), ("160", "224")):
        other = _predictor(name, base + ["INPUT.MIN_SIZE_TEST", short, "INPUT.MAX_SIZE_TEST", long])
        other.model.load_state_dict(predictor.model.state_dict())
        x = other.preprocess(str(images[1]))
        arr, hw = prepare_input(x["image"], None, other.cfg.MODEL.PIXEL_MEAN, 32)
        seen.add(arr.shape)
        result = verify_onnx(str(path), other.model, [arr], image_sizes=[hw])
        assert all(result[n]["max_abs"] <= ATOL + RTOL * result[n]["max_ref"] for n in SETUP[name][2]), result
        got = finish_postprocess(other.model, run_onnx(str(path), arr, image_size=hw), [hw], arr.shape[-2:],
                                 [(x["height"], x["width"])])[0]
        with torch.no_grad():
            ref = other.model([x])[0]
        assert torch.equal(got["labels"], ref["labels"]) and got["masks"].shape == ref["masks"].shape
        assert torch.allclose(got["scores"], ref["scores"], atol=1e-3)
    assert len(seen) == 2  # two input sizes
    with pytest.raises(ValueError, match="SIZE_DIVISIBILITY"):
        export_onnx(predictor.model, str(tmp_path / "e.onnx"), input_size=(250, 352))


def test_simplify_keeps_the_outputs_and_image_size_is_required(images, tmp_path):
    pytest.importorskip("onnxslim")
    import onnx

    predictor = _predictor("fassst")
    plain, slim = tmp_path / "plain.onnx", tmp_path / "slim.onnx"
    export_onnx(predictor.model, str(plain), input_size=SMALL)
    export_onnx(predictor.model, str(slim), input_size=SMALL, simplify=True)
    assert len(onnx.load(str(slim)).graph.node) < len(onnx.load(str(plain)).graph.node)
    assert [i.name for i in onnx.load(str(slim)).graph.input] == ["image", "image_size"]
    arr, hw = prepare_input(predictor.preprocess(str(images[1]))["image"], SMALL, predictor.cfg.MODEL.PIXEL_MEAN)
    a, b = run_onnx(str(plain), arr, image_size=hw), run_onnx(str(slim), arr, image_size=hw)
    assert list(a) == list(b)
    for n in a:
        assert np.allclose(a[n], b[n], rtol=1e-5, atol=1e-6), n
    # the boxes are clipped to the image_size input (107 rows of 128), not to the padded input
    assert a["boxes"][..., 1::2].max() <= hw[0] and hw[0] < SMALL[0]
    with pytest.raises(ValueError, match="image_size"):
        run_onnx(str(slim), arr)


def test_benchmark_onnxruntime_backend(images, tmp_path, capsys):
    """instseg-benchmark --backend onnxruntime: the exported file timed through the harness, with
    the same test inputs, and the wrapper gives the model's own results."""
    import json

    from instseg.export import OnnxRuntimeModel
    from instseg.tools import benchmark_fps

    predictor = _predictor("sparseinst")
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
