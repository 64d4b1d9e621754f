"""instseg.engine.Predictor, the demo tool (instseg/tools/demo.py), draw_instances and
plot_loss_curve (instseg/utils/visualize.py), and the loss curve at the end of training.

The predictor and demo tests run a randomly initialized SparseInst R-50 (BatchNorm, small test
size) on real coco128-seg images (``../shared/data``; skipped when missing), copied to tmp_path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from instseg.utils.visualize import PALETTE, draw_instances, instance_colors, plot_loss_curve, read_loss_csv

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "sparseinst" / "R50_giam.yaml")
OPTS = ["MODEL.RESNETS.NORM", "BN", "INPUT.MIN_SIZE_TEST", "256", "INPUT.MAX_SIZE_TEST", "384", "MODEL.DEVICE", "cpu"]
IMAGES = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg"]


@pytest.fixture(scope="module")
def images(coco128_three_images) -> list:
    return coco128_three_images


@pytest.fixture(scope="module")
def predictor():
    from instseg.engine import Predictor

    return Predictor.from_config_file(CONFIG, OPTS, weights="", allow_random=True)


@pytest.fixture(scope="module")
def rgb_output(predictor, images):
    from instseg.data import read_image

    rgb = read_image(str(images[0]))
    return rgb, predictor(rgb)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- Predictor

def test_predictor_exports_and_eval_mode(predictor):
    import instseg
    import instseg.engine

    assert instseg.Predictor is instseg.engine.Predictor is type(predictor)
    assert not predictor.model.training
    assert predictor.weights == "" and predictor.cfg.is_frozen()


def test_predictor_output_at_original_size(predictor, rgb_output, images):
    from instseg.data import DatasetMapper

    rgb, out = rgb_output
    h, w = rgb.shape[:2]
    assert (h, w) == (480, 640)
    # the model input is the test mapper's, resized to the short side 256
    inp = predictor.preprocess(str(images[0]))
    ref = DatasetMapper(predictor.cfg, is_train=False)({"file_name": str(images[0])})
    assert torch.equal(inp["image"], ref["image"]) and tuple(inp["image"].shape) == (3, 256, 341)
    assert (inp["height"], inp["width"]) == (480, 640)
    assert set(out) == {"scores", "labels", "masks", "boxes"}
    k = out["scores"].shape[0]
    assert 0 < k <= predictor.cfg.TEST.DETECTIONS_PER_IMAGE  # random weights (SEED 42): many pass CLS_THRESHOLD 0.005
    assert out["scores"].dtype == torch.float32 and out["labels"].dtype == torch.int64
    assert out["masks"].dtype == torch.bool and tuple(out["masks"].shape) == (k, 480, 640)
    assert out["boxes"].dtype == torch.float32 and tuple(out["boxes"].shape) == (k, 4)
    assert all(t.device.type == "cpu" for t in out.values())


def test_predictor_bgr_equals_rgb_and_path_equals_array(predictor, rgb_output, images):
    rgb, out = rgb_output
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    assert _same(predictor(bgr, format="BGR"), out)
    assert _same(predictor(str(images[0])), out)
    # the channel order is honoured: BGR pixels read as RGB are another model input
    assert torch.equal(predictor.preprocess(bgr, format="bgr")["image"], predictor.preprocess(rgb)["image"])
    assert not torch.equal(predictor.preprocess(bgr, format="RGB")["image"], predictor.preprocess(rgb)["image"])


def test_predictor_list_input_returns_a_list(predictor, rgb_output, coco128):
    from instseg.data import read_image

    rgb, out = rgb_output
    other = coco128 / "images" / "000000000042.jpg"  # 478 x 640: padded to the same 256 x 352 input
    outs = predictor([rgb, other])
    assert isinstance(outs, list) and len(outs) == 2
    assert tuple(outs[0]["masks"].shape[1:]) == rgb.shape[:2] == (480, 640)
    assert tuple(outs[1]["masks"].shape[1:]) == read_image(str(other)).shape[:2] == (478, 640)
    assert tuple(outs[1]["boxes"].shape) == (outs[1]["scores"].shape[0], 4)
    # the first image in a batch: its single-image prediction, up to the float rounding of
    # batched kernels (compared: the 10 best scores and their masks)
    torch.testing.assert_close(outs[0]["scores"][:10], out["scores"][:10], atol=1e-3, rtol=0)
    agree = (outs[0]["masks"][:10] == out["masks"][:10]).float().mean().item()
    assert agree > 0.999, agree
    assert isinstance(predictor((rgb,)), list) and predictor([]) == []


def test_predictor_errors(predictor, tmp_path):
    from instseg.data import ImageDecodeError
    from instseg.engine import Predictor

    missing = tmp_path / "no_such_weights.ckpt"
    with pytest.raises(FileNotFoundError) as e:
        Predictor(predictor.cfg, weights=str(missing))
    assert str(e.value) == f"Weights file not found: {missing}"
    with pytest.raises(ValueError, match=r"^No weights: MODEL.WEIGHTS is empty"):
        Predictor(predictor.cfg, weights="")

    with pytest.raises(FileNotFoundError) as e:
        predictor(str(tmp_path / "missing.jpg"))
    assert str(e.value) == f"Image file not found: {tmp_path / 'missing.jpg'}"
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ImageDecodeError) as e:
        predictor([np.zeros((8, 8, 3), np.uint8), bad])
    assert str(e.value) == f"{bad}: cannot decode image (corrupt or not an image; OpenCV read nothing)"
    with pytest.raises(ValueError, match=r"^expected a uint8 \(H, W, 3\) image array, got dtype float32 and shape \(8, 8, 3\)$"):
        predictor(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"^format must be 'RGB' or 'BGR', got 'YUV'$"):
        predictor(np.zeros((8, 8, 3), np.uint8), format="YUV")


def test_predictor_loads_weights_strictly(predictor, tmp_path):
    from instseg.checkpoint import IncompleteWeightsError
    from instseg.engine import Predictor

    sd = predictor.model.state_dict()
    full = tmp_path / "full.pth"
    torch.save({"model": sd}, full)
    loaded = Predictor(predictor.cfg, weights=str(full)).model.state_dict()
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    # random initialization: from cfg.SEED, the caller's torch RNG untouched
    state = torch.get_rng_state()
    again = Predictor(predictor.cfg, weights="", allow_random=True).model.state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(again[k], sd[k]) for k in sd)
    part = tmp_path / "part.pth"
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith("decoder.")}}, part)
    with pytest.raises(IncompleteWeightsError, match=r"missing \(not in the file, left as initialized\): decoder\."):
        Predictor(predictor.cfg, weights=str(part))


# ------------------------------------------------------------------------------------ drawing

def test_draw_instances_colors_the_mask_only():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (60, 120, 3), dtype=np.uint8)
    mask = torch.zeros(1, 60, 120, dtype=torch.bool)
    mask[0, 10:41, 20:101] = True
    out = {"scores": torch.tensor([0.9]), "labels": torch.tensor([2]), "masks": mask,
           "boxes": torch.tensor([[20.0, 10.0, 100.0, 40.0]])}
    color = np.array(PALETTE[0], np.float64)  # no thing_colors: the palette by instance index
    expected = img.copy()
    m = mask[0].numpy()
    expected[m] = (img[m] * 0.5 + color * 0.5).astype(np.uint8)
    drawn = draw_instances(img, out, draw_boxes=False)
    assert drawn.dtype == np.uint8 and drawn.shape == img.shape
    np.testing.assert_array_equal(drawn, expected)
    assert not np.array_equal(drawn[m], img[m])

    # with the box and its label: every pixel outside the box is unchanged, the outline has the colour
    boxed = draw_instances(img, out, class_names=["a", "b", "car"], colors=[(0, 0, 0)] * 2 + [(0, 255, 0)])
    outside = np.ones((60, 120), bool)
    outside[10:41, 20:101] = False
    np.testing.assert_array_equal(boxed[outside], img[outside])
    np.testing.assert_array_equal(boxed[40, 60], [0, 255, 0])  # bottom edge, thing_colors[2]
    np.testing.assert_array_equal(boxed[30, 60], (img[30, 60] * 0.5 + np.array([0, 255, 0]) * 0.5).astype(np.uint8))
    # below the threshold: nothing drawn; a wrong size: a clear error
    np.testing.assert_array_equal(draw_instances(img, out, score_threshold=0.95), img)
    with pytest.raises(ValueError, match=r"masks are \(60, 120\) \(H, W\) but the image is \(10, 120\)"):
        draw_instances(img[:10], out)


def test_instance_colors_fallback():
    assert instance_colors([5, 5, 0], None) == [PALETTE[0], PALETTE[1], PALETTE[2]]
    assert instance_colors([1, 7], [(1, 2, 3), (4, 5, 6)]) == [(4, 5, 6), PALETTE[1]]


def test_draw_panoptic_output():
    img = np.full((6, 8, 3), 100, np.uint8)
    pan = torch.zeros(6, 8, dtype=torch.int32)
    pan[:3] = 1
    out = {"panoptic_seg": pan, "segments_info": [{"id": 1, "isthing": False, "category_id": 0}]}
    drawn = draw_instances(img, out, colors=[(200, 0, 0)])
    np.testing.assert_array_equal(drawn[:3], np.broadcast_to(np.array([150, 50, 50], np.uint8), (3, 8, 3)))
    np.testing.assert_array_equal(drawn[3:], img[3:])


# ---------------------------------------------------------------------------------- loss curve

CSV = """epoch,step,train/loss_cls,train/loss_cls_0,train/loss_dice,train/lr,train/total_loss,val/AP
0,19,3.0,3.5,2.0,0.0001,9.0,
0,39,2.0,2.5,1.5,0.0002,6.0,
0,39,,,,,,12.5
0,59,1.0,1.5,0.0,0.0002,3.0,
"""


def test_plot_loss_curve_writes_a_png(tmp_path):
    run = tmp_path / "run" / "csv"
    (run / "version_0").mkdir(parents=True)
    (run / "version_0" / "metrics.csv").write_text(CSV)
    (run / "version_1").mkdir()  # a resumed run: its step 59 wins
    (run / "version_1" / "metrics.csv").write_text("step,train/loss_cls,train/total_loss\n59,0.5,2.5\n79,0.25,2.0\n")
    series = read_loss_csv(run)
    assert series["total_loss"] == ([19, 39, 59, 79], [9.0, 6.0, 2.5, 2.0])
    assert series["loss_dice"] == ([19, 39, 59], [2.0, 1.5, 0.0])
    assert "lr" not in series
    out = plot_loss_curve(tmp_path / "run", tmp_path / "pics" / "loss_curve.png")
    from PIL import Image

    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (800, 500)
    with pytest.raises(FileNotFoundError, match="no metrics.csv under"):
        plot_loss_curve(tmp_path / "pics", tmp_path / "x.png")
    bad = tmp_path / "bad.csv"
    bad.write_text("step,val/AP\n1,2\n")
    with pytest.raises(ValueError, match="no training loss in"):
        plot_loss_curve(bad, tmp_path / "x.png")


def test_training_end_loss_curve_never_raises(tmp_path, caplog):
    import logging

    from instseg.engine.launch import write_loss_curve

    with caplog.at_level(logging.WARNING, logger="instseg"):
        assert write_loss_curve(str(tmp_path)) is None  # no csv/: a warning, no exception
    assert "Loss curve not written to" in caplog.text
    (tmp_path / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "csv" / "version_0" / "metrics.csv").write_text(CSV)
    assert write_loss_curve(str(tmp_path)) == str(tmp_path / "loss_curve.png")
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------- demo

def test_demo_on_a_folder_writes_overlays(images, tmp_path, coco128):
    from PIL import Image

    from instseg.tools.demo import run

    out = tmp_path / "out"
    written = run(["--config-file", CONFIG, "--input", str(images[0].parent), "--output", str(out),
                   "--random-weights", "--dataset", "c128", str(coco128 / "annotations.json"), str(coco128 / "images"),
                   "DATASETS.TRAIN", "('c128',)", "DATASETS.TEST", "('c128',)", *OPTS,
                   "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "224"])
    assert sorted(Path(p).name for p in written) == [n.replace(".jpg", ".png") for n in IMAGES]
    for src in images:
        with Image.open(src) as a, Image.open(out / (src.stem + ".png")) as b:
            assert b.format == "PNG" and b.size == a.size
            assert not np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def test_demo_on_a_video_keeps_fps_and_frame_count(images, tmp_path):
    import cv2

    from instseg.tools.demo import run

    video = tmp_path / "clip.mp4"
    w, h, fps = 160, 120, 12.0
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened()
    for i in range(5):
        writer.write(cv2.resize(cv2.imread(str(images[i % 3])), (w, h)))
    writer.release()
    # the flags after --input: a config key ends the input list
    written = run(["--config-file", CONFIG, "--random-weights", "--output", str(tmp_path / "out"),
                   "--input", str(video), *OPTS, "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160"])
    assert written == [str(tmp_path / "out" / "clip.mp4")]

    def props(path):
        cap = cv2.VideoCapture(str(path))
        n_meta, rate = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), cap.get(cv2.CAP_PROP_FPS)
        frames = []
        while True:
            ok, f = cap.read()
            if not ok:
                break
            frames.append(f.shape)
        cap.release()
        return n_meta, len(frames), rate, set(frames)

    assert props(video)[:3] == (5, 5, fps)
    assert props(written[0]) == (5, 5, fps, {(h, w, 3)})


def test_demo_command_line_errors(capsys):
    from instseg.tools.demo import run

    with pytest.raises(SystemExit) as e:
        run(["--config-file", CONFIG, "--output", "x"])
    assert e.value.code == 2 and "give --input" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run(["--config-file", CONFIG, "--input", "a.mp4", "b.jpg"])
    assert e.value.code == 2 and "a video is processed alone" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run(["--config-file", CONFIG, "--input", "a.jpg", "MODEL.DEVICE", "cpu"])
    assert e.value.code == 2 and "MODEL.WEIGHTS is required" in capsys.readouterr().err
