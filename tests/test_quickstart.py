"""instseg-quickstart's pictures (write_overlays) and its default config: real code paths on a tiny
generated smoke set (no shared data needed)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("sparseinst")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from instseg.data import register_coco_instances
    from instseg.data.smoke import make_smoke_dataset

    root = tmp_path_factory.mktemp("smoke")
    paths = make_smoke_dataset(root, num_images={"val": 3}, image_size=(96, 128), splits=("val",))
    name = "qs_test_smoke_val"
    register_coco_instances(name, paths["val"]["json_file"], paths["val"]["image_root"])
    return name


def _cfg(name):
    from instseg.config import setup_cfg
    from instseg.data import resolve_num_classes
    from instseg.engine.models import import_model_packages
    from instseg.tools.quickstart import default_config_file

    import_model_packages()
    cfg = setup_cfg(default_config_file(), ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", f"('{name}',)",
                                            "MODEL.DEVICE", "cpu"], freeze=False)
    resolve_num_classes(cfg)
    return cfg


def test_write_overlays_draws_ground_truth_left_and_prediction_right(smoke, tmp_path):
    from instseg.data import DatasetCatalog, read_image
    from instseg.data.mapper import annotations_to_masks
    from instseg.modeling import build_model
    from instseg.tools.quickstart import write_overlays

    cfg = _cfg(smoke)
    torch.manual_seed(0)
    weights = str(tmp_path / "w.pth")
    torch.save(build_model(cfg).state_dict(), weights)
    paths = write_overlays(cfg, weights, smoke, str(tmp_path), num=2, score_threshold=2.0)  # no prediction drawn
    assert [p.split("/")[-1] for p in paths] == ["000001.png", "000002.png", "overlays.png"]
    dicts = DatasetCatalog.get(smoke)[:2]
    rows = []
    for d, p in zip(dicts, paths):
        img = read_image(d["file_name"])
        h, w = img.shape[:2]
        row = cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB)
        assert row.shape == (h, 2 * w + 8, 3)
        gt = annotations_to_masks(d["annotations"], h, w).any(0)
        left, right = row[:, :w].astype(int), row[:, w + 8:].astype(int)
        # ground truth blended inside its masks only (PNG is lossless)
        assert (np.abs(left - img).sum(-1)[gt] > 0).mean() > 0.9
        assert np.array_equal(left[~gt], img[~gt])
        # nothing scored >= 2: the prediction side is the image itself
        assert np.array_equal(right, img)
        rows.append(row)
    mosaic = cv2.cvtColor(cv2.imread(paths[-1]), cv2.COLOR_BGR2RGB)
    assert mosaic.shape == (sum(r.shape[0] + 8 for r in rows), max(r.shape[1] for r in rows), 3)
    assert np.array_equal(mosaic[: rows[0].shape[0]], rows[0])
    assert write_overlays(cfg, weights, smoke, str(tmp_path), num=0) == []
