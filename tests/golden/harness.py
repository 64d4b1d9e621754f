"""Golden outputs of the four default configs (issue 9, "golden outputs first").

For each model's default config, with fixed random weights and three real coco128-seg images,
records the eval outputs (scores, labels, boxes, mask areas and a mask checksum: the centroid of
each mask) and the training loss terms for one image with its ground truth. ``record.py`` writes
them to ``golden_outputs.json``; ``tests/test_golden.py`` recomputes and compares them, so a
refactor that changes any model's outputs fails.

Weights do not depend on the order in which modules are built: every floating tensor of the
state dict that is not constant is redrawn from a generator seeded by the CRC32 of its name, with
standard deviation ``1 / sqrt(fan_in)`` (matrices and kernels) or 0.02 (vectors); constant tensors
(biases at a prior, norm scales, FrozenBN statistics) and tensors whose rows are all equal
(QueryInst's initial whole-image proposal boxes) keep their value.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Dict, List

import torch

DEFAULT_CONFIGS = {
    "SparseInst": "configs/sparseinst/R50_giam.yaml",
    "FastInst": "configs/fastinst/R50_D3_640.yaml",
    "QueryInst": "configs/queryinst/R50_FPN_100q_1x.yaml",
    "FASSST": "configs/fassst/MNv2_416.yaml",
}
# small sizes keep the test fast on 2 CPU cores; the same for training and test
SIZE_OPTS = [
    "INPUT.MIN_SIZE_TEST", "320", "INPUT.MAX_SIZE_TEST", "480",
    "INPUT.MIN_SIZE_TRAIN", "(320,)", "INPUT.MAX_SIZE_TRAIN", "480",
    "INPUT.RANDOM_FLIP", "none", "INPUT.CROP.ENABLED", "False",
    "MODEL.DEVICE", "cpu", "MODEL.NUM_CLASSES", "80",
]
# QueryInst refines its boxes through 6 stages of exp(dw): with random box-regression weights the
# boxes blow up (~1e10 pixels: degenerate outputs, RoIAlign fails in training). Small fc_reg weights
# keep them near the initial whole-image proposals, a little inside or outside the border.
STD_OVERRIDES = {"QueryInst": {"fc_reg.weight": 0.003}}
NUM_IMAGES = 3
REPO = Path(__file__).resolve().parents[2]


def deterministic_weights(model: torch.nn.Module, std_overrides=None) -> None:
    """Redraw every non-constant floating tensor of ``model``'s state dict by its name (see module
    docstring), in place; ``std_overrides`` maps a name suffix to the standard deviation to use."""
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point() or t.numel() == 0:
                continue
            if bool((t == t[:1]).all()):  # constant, or every row equal (e.g. initial proposal boxes)
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            std = 1.0 / math.sqrt(t[0].numel()) if t.dim() >= 2 else 0.02
            for suffix, value in (std_overrides or {}).items():
                if name.endswith(suffix):
                    std = value
            t.copy_(torch.randn(t.shape, generator=g) * std)


def build(meta_arch: str, extra_opts=()):
    from instseg.config import setup_cfg
    from instseg.modeling import build_model

    cfg = setup_cfg(str(REPO / DEFAULT_CONFIGS[meta_arch]), SIZE_OPTS + list(extra_opts))
    torch.manual_seed(0)
    model = build_model(cfg)
    deterministic_weights(model, STD_OVERRIDES.get(meta_arch))
    return cfg, model


def load_images(coco128: Path) -> List[Dict]:
    from instseg.data import load_coco_json

    dicts = load_coco_json(str(coco128 / "annotations_tiny8.json"), str(coco128 / "images"))
    return [d for d in dicts if d["annotations"]][:NUM_IMAGES]


def summarize_output(out: Dict[str, torch.Tensor]) -> Dict[str, list]:
    """Per instance, sorted by descending score: score, label, box, mask area and centroid."""
    scores = out["scores"].float()
    order = torch.argsort(scores, descending=True, stable=True)
    masks = out["masks"][order].bool()
    k, h, w = masks.shape
    area = masks.flatten(1).sum(1).double()
    ys = torch.arange(h, dtype=torch.float64)[None, :, None]
    xs = torch.arange(w, dtype=torch.float64)[None, None, :]
    m = masks.double()
    cy = (m * ys).flatten(1).sum(1) / area.clamp(min=1)
    cx = (m * xs).flatten(1).sum(1) / area.clamp(min=1)
    return {
        "scores": [round(float(v), 7) for v in scores[order]],
        "labels": [int(v) for v in out["labels"][order]],
        "boxes": [[round(float(c), 3) for c in b] for b in out["boxes"][order].float()],
        "mask_area": [int(v) for v in area],
        "mask_centroid": [[round(float(a), 3), round(float(b), 3)] for a, b in zip(cy, cx)],
        "shape": [k, h, w],
    }


def compute(meta_arch: str, coco128: Path, extra_opts=()) -> Dict:
    """Eval outputs on three images and training losses on the first one, for one model."""
    from instseg.data import DatasetMapper

    cfg, model = build(meta_arch, extra_opts)
    images = load_images(coco128)
    test_mapper = DatasetMapper(cfg, is_train=False)
    model.eval()
    outputs = []
    with torch.no_grad():
        for d in images:
            outputs.append(summarize_output(model([test_mapper(d)])[0]))
    train_mapper = DatasetMapper(cfg, is_train=True)
    model.train()
    torch.manual_seed(0)
    losses = model([train_mapper(images[0])])
    return {
        "images": [d["file_name"].rsplit("/", 1)[-1] for d in images],
        "outputs": outputs,
        "losses": {k: float(v.detach()) for k, v in sorted(losses.items())},
    }
