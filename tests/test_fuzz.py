"""Fuzz tests of the data path (issue 11, item 8), with hypothesis.

Random mutations of a real sample json (two coco128-seg images, copied): NaN/Inf/huge/negative
coordinates, missing keys, wrong types, duplicate ids, unknown categories, mismatched sizes,
RLEs of random size and runs, invalid JSON, truncated images, and defects put into the dataset
dicts after loading (custom loaders bypass ``load_coco_json``: the mapper checks again). Each case
goes through ``load_coco_json -> DatasetMapper(train)`` and, for some, one training forward of a
tiny SparseInst; it must either succeed (finite losses) or raise one of the documented errors
(:class:`instseg.data.DatasetError` subclasses, ``FileNotFoundError``) whose message names the
image, and the annotation where the defect is in one.

Memory and time are bounded: the hypothesis tests run in a child pytest process
(:func:`test_fuzz_in_a_memory_limited_subprocess`) whose address space is limited to its size
after the imports + 4 GiB (``resource.setrlimit(RLIMIT_AS)``), under a timeout. Before issue 11,
one NaN or 1e8 coordinate made pycocotools take 21 GB or segfault.

Counts (derandomized, so CI runs the same cases): 200 load+mapper cases and 50 more that also run
the model forward when an image survives (about a third do),
plus the explicit examples; about 30 s on 2 CPU cores.
"""
from __future__ import annotations

import copy
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

CHILD = os.environ.get("INSTSEG_FUZZ_CHILD") == "1"
SUMMARY = os.environ.get("INSTSEG_FUZZ_SUMMARY")
IMAGE_IDS = (25, 36)  # 2 annotations each; landscape and portrait
N_MAP, N_FORWARD = 200, 50
LIMIT_EXTRA = 4 * 2**30

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

# no .hypothesis/ folder in the repository (failure patches); the tests use no example database
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "instseg_fuzz_hypothesis"))

# --------------------------------------------------------------------------------------------- #
# the parent: run the fuzz tests in a child with a memory limit and a timeout
# --------------------------------------------------------------------------------------------- #


def test_fuzz_in_a_memory_limited_subprocess(coco128, tmp_path):
    summary = tmp_path / "summary.json"
    env = dict(os.environ, INSTSEG_FUZZ_CHILD="1", INSTSEG_FUZZ_SUMMARY=str(summary), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "fuzz_case"],
        cwd=str(Path(__file__).resolve().parents[1]), env=env, capture_output=True, text=True, timeout=400,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    res = json.loads(summary.read_text())
    print(f"fuzz: {res} in {elapsed:.1f} s")
    assert res["map_cases"] >= N_MAP + N_FORWARD and res["forward_cases"] >= N_FORWARD // 3
    assert res["errors"] > 50 and res["ok"] > 50  # both outcomes are exercised
    assert res["limit_bytes"] > 0


# --------------------------------------------------------------------------------------------- #
# the child
# --------------------------------------------------------------------------------------------- #
_STATE = {"map_cases": 0, "forward_cases": 0, "ok": 0, "errors": 0, "by_error": {}, "limit_bytes": 0}


@pytest.fixture(scope="module")
def sample(coco128):
    """The sample json (3 images) and the image folder, copied; the memory limit is set here."""
    if not CHILD:
        pytest.skip("runs inside test_fuzz_in_a_memory_limited_subprocess (INSTSEG_FUZZ_CHILD=1)")
    import cv2  # noqa: F401 - imported before the limit
    import pycocotools.mask  # noqa: F401
    import shapely  # noqa: F401
    import torch  # noqa: F401
    from fvcore.transforms import transform  # noqa: F401

    raw = json.loads((coco128 / "annotations.json").read_text())
    images = [im for im in raw["images"] if im["id"] in IMAGE_IDS]
    annos = [a for a in raw["annotations"] if a["image_id"] in IMAGE_IDS]
    base = Path(tempfile.mkdtemp(prefix="fuzz_sample_"))
    for im in images:
        shutil.copy(coco128 / "images" / im["file_name"], base / im["file_name"])
    vm = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + LIMIT_EXTRA if hard == resource.RLIM_INFINITY else min(hard, vm + LIMIT_EXTRA)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    _STATE["limit_bytes"] = limit
    yield {"images": images, "annotations": annos, "categories": raw["categories"]}, base
    shutil.rmtree(base, ignore_errors=True)
    if SUMMARY:
        Path(SUMMARY).write_text(json.dumps(_STATE))


VALUES = [math.nan, math.inf, -math.inf, 1e8, -1e8, 1e300, -1e300, -5.0, 0.0, 1e5, 2.0**40]
WRONG = ["x", None, [], {}, 1.5, True, [[1, 2]], -1, 0, {"size": [1]}, [1, 2, 3]]
ANN_KEYS = ["id", "image_id", "category_id", "bbox", "segmentation", "iscrowd"]
IMG_KEYS = ["id", "file_name", "height", "width"]

mutation = st.one_of(
    st.tuples(st.just("coord"), st.integers(0, 5), st.integers(0, 40), st.sampled_from(VALUES)),
    st.tuples(st.just("bbox"), st.integers(0, 5), st.integers(0, 3), st.sampled_from(VALUES)),
    st.tuples(st.just("ann_del"), st.integers(0, 5), st.sampled_from(ANN_KEYS)),
    st.tuples(st.just("ann_type"), st.integers(0, 5), st.sampled_from(ANN_KEYS), st.sampled_from(WRONG)),
    st.tuples(st.just("img_del"), st.integers(0, 2), st.sampled_from(IMG_KEYS)),
    st.tuples(st.just("img_type"), st.integers(0, 2), st.sampled_from(IMG_KEYS), st.sampled_from(WRONG)),
    st.tuples(st.just("dup_ann"), st.integers(0, 5), st.integers(0, 5)),
    st.tuples(st.just("dup_img"), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("category"), st.integers(0, 5), st.sampled_from([0, 91, 999, -1, 2**40])),
    st.tuples(st.just("size"), st.integers(0, 2), st.sampled_from(["height", "width"]), st.sampled_from([-1, 1, 7, 2.0])),
    st.tuples(st.just("rle"), st.integers(0, 5), st.sampled_from(["ok", "size", "short", "long", "negative", "string"])),
    st.tuples(st.just("polygon"), st.integers(0, 5), st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), max_size=12)),
    st.tuples(st.just("truncate"), st.integers(0, 2), st.sampled_from([0.0, 0.1, 0.5, 0.99])),
    st.tuples(st.just("invalid_json"), st.integers(0, 2000)),
    st.tuples(st.just("post_coord"), st.integers(0, 5), st.integers(0, 40), st.sampled_from(VALUES)),
    st.tuples(st.just("post_rle"), st.integers(0, 5), st.sampled_from(["size", "long", "string"])),
)
FINITE = [1e8, -1e8, 1e300, -1e300, -5.0, 0.0, 1e5, 2.0**40, -640.0, 1280.5]
# defects that the loader and the mapper repair (clipping, dropping): these cases reach the model
repairable = st.one_of(
    st.tuples(st.just("coord"), st.integers(0, 5), st.integers(0, 40), st.sampled_from(FINITE)),
    st.tuples(st.just("post_coord"), st.integers(0, 5), st.integers(0, 40), st.sampled_from(FINITE)),
    st.tuples(st.just("bbox"), st.integers(0, 5), st.integers(0, 1), st.sampled_from(FINITE)),
    st.tuples(st.just("polygon"), st.integers(0, 5), st.lists(st.floats(-1e12, 1e12), max_size=12)),
    st.tuples(st.just("rle"), st.integers(0, 5), st.just("ok")),
    st.tuples(st.just("ann_del"), st.integers(0, 5), st.just("segmentation")),
)
mutations = st.one_of(st.lists(mutation, min_size=0, max_size=3), st.lists(repairable, min_size=1, max_size=3))

ANN_LEVEL = {"coord", "bbox", "ann_del", "ann_type", "dup_ann", "category", "rle", "polygon", "post_coord", "post_rle"}


def _rle(kind, h, w):
    from pycocotools import mask as mask_util

    if kind == "string":
        import numpy as np

        m = np.zeros((h, w), dtype=np.uint8, order="F")
        m[h // 4: h // 2, w // 4: w // 2] = 1
        return {"size": [h, w], "counts": mask_util.encode(m)["counts"].decode()[:-3]}  # cut short
    runs = {"ok": [h * w // 3, h * w // 3, h * w - 2 * (h * w // 3)], "size": [100], "short": [h * w - 10],
            "long": [h * w * 50], "negative": [h * w + 5, -5]}[kind]
    size = [10, 10] if kind == "size" else [h, w]
    return {"size": size, "counts": runs}


def _apply(raw, root: Path, muts):
    """Apply the pre-load mutations; return the post-load ones and the json text."""
    post, text = [], None
    for m in muts:
        try:
            _apply_one(m, raw, root, post)
        except (KeyError, IndexError, TypeError, AttributeError, ZeroDivisionError):
            pass  # the mutation does not apply after an earlier one (e.g. its key was deleted)
        if m[0] == "invalid_json":
            text = json.dumps(raw)
            pos = m[1] % len(text)
            text = text[:pos] + "{]" + text[pos:]
    return post, text if text is not None else json.dumps(raw)


def _apply_one(m, raw, root: Path, post) -> None:
    anns, imgs = raw["annotations"], raw["images"]
    kind = m[0]
    if kind in ("post_coord", "post_rle"):
        post.append(m)
    elif kind == "coord":
        poly = anns[m[1] % len(anns)]["segmentation"][0]
        poly[m[2] % len(poly)] = m[3]
    elif kind == "bbox":
        anns[m[1] % len(anns)]["bbox"][m[2]] = m[3]
    elif kind == "ann_del":
        anns[m[1] % len(anns)].pop(m[2], None)
    elif kind == "ann_type":
        anns[m[1] % len(anns)][m[2]] = copy.deepcopy(m[3])
    elif kind == "img_del":
        imgs[m[1] % len(imgs)].pop(m[2], None)
    elif kind == "img_type":
        imgs[m[1] % len(imgs)][m[2]] = copy.deepcopy(m[3])
    elif kind == "dup_ann":
        anns[m[1] % len(anns)]["id"] = anns[m[2] % len(anns)].get("id")
    elif kind == "dup_img":
        imgs[m[1] % len(imgs)]["id"] = imgs[m[2] % len(imgs)].get("id")
    elif kind == "category":
        anns[m[1] % len(anns)]["category_id"] = m[2]
    elif kind == "size":
        v = imgs[m[1] % len(imgs)].get(m[2])
        if isinstance(v, int) and not isinstance(v, bool):
            imgs[m[1] % len(imgs)][m[2]] = v * m[3] if isinstance(m[3], float) else v + m[3]
    elif kind == "rle":
        a = anns[m[1] % len(anns)]
        im = next((i for i in imgs if i.get("id") == a.get("image_id")), None)
        h, w = (im.get("height"), im.get("width")) if im else (10, 10)
        if isinstance(h, int) and isinstance(w, int) and 0 < h < 5000 and 0 < w < 5000:
            a["segmentation"] = _rle(m[2], h, w)
    elif kind == "polygon":
        anns[m[1] % len(anns)]["segmentation"] = [list(m[2])]
    elif kind == "truncate":
        name = imgs[m[1] % len(imgs)].get("file_name")
        if isinstance(name, str) and (root / name).is_file():
            data = (root / name).read_bytes()
            (root / name).unlink()  # a symlink to the sample: replace, never write through it
            (root / name).write_bytes(data[: int(len(data) * m[2])])


def _apply_post(dicts, post):
    """Defects put into the dataset dicts after loading (a custom loader's output)."""
    annos = [(d, a) for d in dicts for a in d["annotations"]]
    for m in post:
        if not annos:
            return
        d, a = annos[m[1] % len(annos)]
        if m[0] == "post_coord" and isinstance(a["segmentation"], list) and a["segmentation"]:
            poly = a["segmentation"][0]
            poly[m[2] % len(poly)] = m[3]
        elif m[0] == "post_rle":
            a["segmentation"] = _rle(m[2], d["height"], d["width"])


def _names_image(msg: str, raw) -> bool:
    names = [im.get("file_name") for im in raw["images"] if isinstance(im, dict)]
    return "image " in msg or any(isinstance(n, str) and n and n in msg for n in names)


_MODEL = {}


def _model(num_classes: int):
    if num_classes not in _MODEL:
        import torch
        from sparseinst import IAMDecoder, InstanceContextEncoder, SparseInst, SparseInstCriterion
        from sparseinst.matcher import DiceScoreMatcher
        from test_template import MEAN, STD, TinyBackbone

        torch.manual_seed(0)
        _MODEL[num_classes] = SparseInst(
            backbone=TinyBackbone(),
            encoder=InstanceContextEncoder([16, 24, 32], channels=32, ppm_channels=8),
            decoder=IAMDecoder(32, num_classes=num_classes, num_masks=6, kernel_dim=8, inst_dim=16, inst_convs=1,
                               mask_dim=16, mask_convs=1),
            criterion=SparseInstCriterion(num_classes, DiceScoreMatcher()),
            pixel_mean=MEAN, pixel_std=STD, detections_per_image=5, cls_threshold=0.0,
        ).train()
    return _MODEL[num_classes]


def _mapper():
    if "mapper" not in _MODEL:
        from instseg.config import get_cfg
        from instseg.data import DatasetMapper

        cfg = get_cfg()
        cfg.INPUT.MIN_SIZE_TRAIN = (64,)
        cfg.INPUT.MAX_SIZE_TRAIN = 96
        _MODEL["mapper"] = DatasetMapper(cfg, is_train=True)
    return _MODEL["mapper"]


def _run_case(sample, muts, forward: bool):
    import torch

    from instseg.data import DatasetError, load_coco_json

    base_raw, base = sample
    raw = copy.deepcopy(base_raw)
    with tempfile.TemporaryDirectory(prefix="fuzz_case_") as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        for p in base.iterdir():
            (root / p.name).symlink_to(p)
        post, text = _apply(raw, root, muts)
        jf = Path(tmp) / "ann.json"
        jf.write_text(text)
        _STATE["map_cases"] += 1
        try:
            dicts = load_coco_json(str(jf), str(root))
            _apply_post(dicts, post)
            mapper = _mapper()
            batch = [mapper(d) for d in dicts if d["annotations"]]
            if forward:
                batch = [b for b in batch if len(b["instances"]["labels"])]
                if batch:
                    _STATE["forward_cases"] += 1
                    torch.manual_seed(0)
                    losses = _model(len(base_raw["categories"]))(batch)
                    assert all(torch.isfinite(v) for v in losses.values()), losses
            _STATE["ok"] += 1
        except (DatasetError, FileNotFoundError) as e:
            _STATE["errors"] += 1
            name = type(e).__name__
            _STATE["by_error"][name] = _STATE["by_error"].get(name, 0) + 1
            msg = str(e)
            if name == "DatasetJSONError":
                assert str(jf) in msg, msg
                if "invalid JSON" in msg:
                    assert "line" in msg and "column" in msg, msg
            elif name == "AnnotationError":
                # the image, or the annotation when its image reference itself is the defect
                assert _names_image(msg, raw) or "annotation " in msg, msg
                if muts and all(m[0] in ANN_LEVEL for m in muts):
                    assert "annotation" in msg, msg
            else:
                assert _names_image(msg, raw) or str(root) in msg, msg


NASTY = [
    [("coord", 0, 1, math.nan)], [("coord", 1, 2, math.inf)], [("coord", 2, 3, 1e8)], [("coord", 3, 0, -1e300)],
    [("bbox", 0, 2, math.nan)], [("truncate", 0, 0.3)], [("rle", 0, "long")], [("rle", 1, "string")],
    [("post_coord", 0, 0, 1e8)], [("post_coord", 1, 1, math.nan)], [("post_rle", 2, "long")],
    [("post_rle", 0, "string")], [("invalid_json", 10)], [("size", 1, "height", 7)], [],
]


def _with_examples(f):
    for m in NASTY:
        f = example(muts=m)(f)
    return f


@settings(max_examples=N_MAP, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@_with_examples
@given(muts=mutations)
def test_fuzz_case_load_and_map(sample, muts):
    _run_case(sample, muts, forward=False)


@settings(max_examples=N_FORWARD, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@example(muts=[("coord", 2, 3, 1e8)])
@example(muts=[("post_coord", 0, 0, -1e8)])
@example(muts=[])
@given(muts=st.one_of(st.lists(repairable, min_size=1, max_size=3), mutations))
def test_fuzz_case_forward(sample, muts):
    _run_case(sample, muts, forward=True)
