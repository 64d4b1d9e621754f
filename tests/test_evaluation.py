"""COCO evaluator, inference loop, distributed gather and timing harness.

The COCO tests use real annotations (shared/data/coco128-seg/annotations_tiny8.json: 8 images,
30 instances, 12 categories) and are skipped when the shared data folder is absent.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from instseg.evaluation import (
    COCOEvaluator,
    benchmark_model,
    count_flops,
    count_parameters,
    fast_eval_available,
    inference_on_dataset,
)
from instseg.utils import comm

# pycocotools' annToMask (used to build the predictions) warns under NumPy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = DATA / "coco128-seg" / "annotations_tiny8.json"


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def gt():
    """(inputs, outputs, coco, cat_ids) with the ground truth rasterized as predictions."""
    if not TINY.is_file():
        pytest.skip(f"shared data not found: {TINY}")
    from pycocotools.coco import COCO
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(TINY))
    cat_ids = sorted(coco.getCatIds())
    to_contiguous = {c: i for i, c in enumerate(cat_ids)}
    inputs, outputs = [], []
    for img in coco.loadImgs(sorted(coco.getImgIds())):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"], iscrowd=False))
        h, w = img["height"], img["width"]
        masks = np.stack([coco.annToMask(a) for a in anns]).astype(bool) if anns else np.zeros((0, h, w), bool)
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                           a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=np.float32).reshape(-1, 4)
        inputs.append({"image_id": img["id"], "height": h, "width": w, "file_name": img["file_name"]})
        outputs.append({
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor([to_contiguous[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": torch.from_numpy(masks),
            "boxes": torch.from_numpy(boxes),
        })
    return inputs, outputs, coco, cat_ids


def run_eval(inputs, outputs, **kwargs):
    ev = COCOEvaluator(str(TINY), **kwargs)
    ev.reset()
    # two batches, as a loader would deliver them
    ev.process(inputs[:3], outputs[:3])
    ev.process(inputs[3:], outputs[3:])
    return ev.evaluate()


# --------------------------------------------------------------------------- COCO evaluator
def test_ground_truth_as_predictions_scores_100(gt):
    inputs, outputs, _, _ = gt
    res = run_eval(inputs, outputs)
    assert set(res) == {"segm", "bbox"}
    for task in ("segm", "bbox"):
        assert set(res[task]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert res[task]["AP"] == pytest.approx(100.0)
        assert res[task]["AP50"] == pytest.approx(100.0)
        assert res[task]["AP75"] == pytest.approx(100.0)
        for k in ("APs", "APm", "APl"):  # 100, or NaN if no GT of that size
            assert math.isnan(res[task][k]) or res[task][k] == pytest.approx(100.0)


def test_dropping_half_the_instances_lowers_ap(gt):
    inputs, outputs, _, _ = gt
    dropped = []
    for o in outputs:
        keep = torch.arange(len(o["scores"])) % 2 == 0
        dropped.append({k: v[keep] for k, v in o.items()})
    res = run_eval(inputs, dropped)
    for task in ("segm", "bbox"):
        assert 0.0 < res[task]["AP"] < 95.0, res[task]


def test_shifted_masks_lower_segm_ap_only(gt):
    inputs, outputs, _, _ = gt
    shifted = [dict(o, masks=torch.roll(o["masks"], shifts=(6, 6), dims=(1, 2))) for o in outputs]
    res = run_eval(inputs, shifted)
    assert 0.0 < res["segm"]["AP"] < 90.0
    assert res["bbox"]["AP"] == pytest.approx(100.0)  # boxes untouched


def test_lower_scores_for_false_positives_keep_ap(gt):
    """Extra low-score junk after every true positive does not change AP (ranking matters)."""
    inputs, outputs, _, cat_ids = gt
    noisy = []
    for inp, o in zip(inputs, outputs):
        k = len(o["scores"])
        junk_masks = torch.zeros((k, inp["height"], inp["width"]), dtype=torch.bool)
        junk_masks[:, :5, :5] = True
        noisy.append({
            "scores": torch.cat([o["scores"], torch.full((k,), 0.1)]),
            "labels": torch.cat([o["labels"], o["labels"]]),
            "masks": torch.cat([o["masks"], junk_masks]),
            "boxes": torch.cat([o["boxes"], torch.tensor([[0.0, 0.0, 5.0, 5.0]]).repeat(k, 1)]),
        })
    res = run_eval(inputs, noisy)
    assert res["segm"]["AP"] == pytest.approx(100.0)
    assert res["bbox"]["AP"] == pytest.approx(100.0)


def test_wrong_labels_give_near_zero(gt):
    inputs, outputs, _, cat_ids = gt
    wrong = [dict(o, labels=(o["labels"] + 1) % len(cat_ids)) for o in outputs]
    res = run_eval(inputs, wrong)
    for task in ("segm", "bbox"):
        assert res[task]["AP"] < 5.0, res[task]


def test_subset_of_images_uses_only_those_ids(gt):
    inputs, outputs, coco, _ = gt
    ev = COCOEvaluator(str(TINY))
    ev.process(inputs[:3], outputs[:3])
    res = ev.evaluate()
    # Had the 5 unprocessed images been scored, their ground truth would count as missed.
    assert res["segm"]["AP"] == pytest.approx(100.0)
    assert res["bbox"]["AP"] == pytest.approx(100.0)
    # The same 3 images, but with the predictions of one image missing: below 100.
    ev.reset()
    empty = {k: v[:0] for k, v in outputs[1].items()}
    assert len(outputs[1]["scores"]) > 0
    ev.process(inputs[:3], [outputs[0], empty, outputs[2]])
    res2 = ev.evaluate()
    assert res2["segm"]["AP"] < 100.0


def test_duplicate_images_counted_once(gt):
    """A DistributedSampler pads with repeated images; they must not add false positives."""
    inputs, outputs, _, _ = gt
    ev = COCOEvaluator(str(TINY))
    ev.process(inputs, outputs)
    ev.process(inputs[::-1], outputs[::-1])  # the duplicates would be false positives
    assert ev.evaluate()["segm"]["AP"] == pytest.approx(100.0)


def test_per_category_keys(gt):
    inputs, outputs, coco, cat_ids = gt
    res = run_eval(inputs, outputs, per_category=True, tasks=("segm",))
    assert set(res) == {"segm"}
    names = [c["name"] for c in coco.loadCats(cat_ids)]
    per_cat = {k: v for k, v in res["segm"].items() if k.startswith("AP-")}
    assert set(per_cat) == {f"AP-{n}" for n in names}
    present = {coco.loadCats(a["category_id"])[0]["name"] for a in coco.dataset["annotations"]}
    for n in names:
        v = per_cat[f"AP-{n}"]
        if n in present:
            assert v == pytest.approx(100.0)
        else:
            assert math.isnan(v)
    assert "AP-person" in per_cat and per_cat["AP-person"] == pytest.approx(100.0)


def test_results_json_loadable(gt, tmp_path):
    inputs, outputs, coco, _ = gt
    res = run_eval(inputs, outputs, output_dir=str(tmp_path))
    path = tmp_path / "coco_instances_results.json"
    results = json.loads(path.read_text())
    assert len(results) == len(coco.dataset["annotations"])
    r = results[0]
    assert set(r) == {"image_id", "category_id", "score", "bbox", "segmentation"}
    assert r["category_id"] in coco.getCatIds()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes(str(path))
    assert len(dt.getAnnIds()) == len(results)
    # the json bbox (xywh) round-trips the predicted xyxy box
    ann = coco.loadAnns(coco.getAnnIds(imgIds=r["image_id"]))
    assert any(np.allclose(a["bbox"], r["bbox"], atol=1e-3) for a in ann)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["segm"]["AP"] == pytest.approx(res["segm"]["AP"])


def test_empty_predictions_give_zero(gt, caplog):
    inputs, outputs, _, _ = gt
    empty = [{k: v[:0] for k, v in o.items()} for o in outputs]
    with caplog.at_level("WARNING"):
        res = run_eval(inputs, empty)
    for task in ("segm", "bbox"):
        assert res[task]["AP"] == 0.0 and res[task]["AP50"] == 0.0
        for v in res[task].values():
            assert v == 0.0 or math.isnan(v)
    assert any("No predictions" in r.message for r in caplog.records)


def test_explicit_mapping_and_errors(gt, tmp_path):
    inputs, outputs, _, cat_ids = gt
    mapping = {i: c for i, c in enumerate(cat_ids)}
    res = run_eval(inputs, outputs, contiguous_to_dataset_id=mapping, tasks=("bbox",))
    assert res["bbox"]["AP"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="not in the categories"):
        COCOEvaluator(str(TINY), contiguous_to_dataset_id={0: 100000})
    with pytest.raises(ValueError, match="tasks"):
        COCOEvaluator(str(TINY), tasks=("keypoints",))
    ev = COCOEvaluator(str(TINY))
    bad = dict(outputs[0], masks=outputs[0]["masks"][:, :10])
    with pytest.raises(ValueError, match="original size"):
        ev.process(inputs[:1], [bad])
    with pytest.raises(ValueError, match="no category id"):
        ev.process(inputs[:1], [dict(outputs[0], labels=outputs[0]["labels"] + 1000)])
    ev.reset()
    ev.process([dict(inputs[0], image_id=123456789)], outputs[:1])
    with pytest.raises(ValueError, match="not in"):
        ev.evaluate()


@pytest.mark.skipif(not fast_eval_available(), reason="faster_coco_eval not installed")
def test_fast_eval_matches_pycocotools(gt):
    inputs, outputs, _, _ = gt
    dropped = []
    for o in outputs:
        keep = torch.arange(len(o["scores"])) % 3 != 0
        d = {k: v[keep] for k, v in o.items()}
        d["scores"] = torch.linspace(1.0, 0.5, len(d["scores"]))
        dropped.append(d)
    slow = run_eval(inputs, dropped)
    fast = run_eval(inputs, dropped, use_fast_eval=True)
    full = run_eval(inputs, outputs, use_fast_eval=True)
    assert full["segm"]["AP"] == pytest.approx(100.0)
    for task in ("segm", "bbox"):
        for k in ("AP", "AP50", "AP75"):
            assert fast[task][k] == pytest.approx(slow[task][k], abs=1e-6)


# --------------------------------------------------------------------------- inference loop
class LookupModel(nn.Module):
    """Returns the stored prediction of each image id; records grad mode and training flag."""

    def __init__(self, outputs_by_id):
        super().__init__()
        self.outputs_by_id = outputs_by_id
        self.lin = nn.Linear(1, 1)
        self.seen = []

    def forward(self, batch):
        self.seen.append((torch.is_grad_enabled(), self.training))
        return [self.outputs_by_id[x["image_id"]] for x in batch]


def test_inference_on_dataset(gt):
    inputs, outputs, _, _ = gt
    model = LookupModel({i["image_id"]: o for i, o in zip(inputs, outputs)})
    model.train()
    loader = [inputs[i: i + 2] for i in range(0, len(inputs), 2)]
    res = inference_on_dataset(model, loader, COCOEvaluator(str(TINY)))
    assert res["segm"]["AP"] == pytest.approx(100.0)
    assert model.seen == [(False, False)] * len(loader)
    assert model.training  # restored
    # without evaluator: inference only
    assert inference_on_dataset(model, iter(loader), None) == {}


# --------------------------------------------------------------------------- distributed
def _ddp_worker(rank, world, init_file, out_dir, inputs, outputs, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert comm.get_world_size() == world and comm.get_rank() == rank
        gathered = comm.all_gather({"rank": rank})
        ev = COCOEvaluator(str(TINY), output_dir=out_dir)
        # strided shards, as DistributedSampler(shuffle=False) gives
        ev.process(inputs[rank::world], outputs[rank::world])
        res = ev.evaluate()
        queue.put((rank, gathered, res))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_evaluate_gathers_across_ranks(gt, tmp_path):
    import torch.multiprocessing as mp

    inputs, outputs, _, _ = gt
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_file = tmp_path / "dist_init"
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, str(init_file), str(tmp_path), inputs, outputs, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    for _ in procs:
        rank, gathered, res = queue.get(timeout=120)
        got[rank] = (gathered, res)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got[0][0] == [{"rank": 0}, {"rank": 1}] == got[1][0]
    assert got[1][1] == {}
    # rank 0 scores all 8 images (each rank saw 4)
    assert got[0][1]["segm"]["AP"] == pytest.approx(100.0)
    results = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert {r["image_id"] for r in results} == {i["image_id"] for i in inputs}
    assert len(results) == sum(len(o["scores"]) for o in outputs)


def test_comm_single_process():
    assert comm.get_world_size() == 1 and comm.get_rank() == 0 and comm.is_main_process()
    assert comm.all_gather({"a": 1}) == [{"a": 1}]
    assert comm.gather(3) == [3]
    comm.synchronize()


# --------------------------------------------------------------------------- timing harness
class TinyContractModel(nn.Module):
    """Data-contract model: normalize, conv 3->4 (3x3) + 1x1 conv 4->2, upsample, threshold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1, bias=False)
        self.norm = nn.BatchNorm2d(4)  # buffers must not be counted
        self.norm.weight.requires_grad_(False)  # frozen parameters are counted
        self.register_buffer("mean", torch.tensor([120.0, 110.0, 100.0]).view(3, 1, 1))

    def forward(self, batch):
        outs = []
        for x in batch:
            img = (x["image"].float() - self.mean)[None] / 60.0
            logits = self.head(torch.relu(self.norm(self.conv(img))))
            logits = nn.functional.interpolate(logits, size=(x["height"], x["width"]),
                                               mode="bilinear", align_corners=False)[0]
            masks = logits > 0
            outs.append({"scores": logits.flatten(1).sigmoid().mean(1), "labels": torch.arange(2),
                         "masks": masks, "boxes": torch.zeros(2, 4)})
        return outs


def _images(n, h=32, w=48):
    return [{"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8), "height": h,
             "width": w, "image_id": i} for i in range(n)]


def test_benchmark_model_tiny():
    model = TinyContractModel().train()
    res = benchmark_model(model, _images(3), num_warmup=2, num_iter=7)
    assert res["fps"] > 0 and res["ms_per_image"] > 0 and res["ms_std"] >= 0
    assert res["num_iter"] == 7 and res["num_warmup"] == 2
    assert res["input_size"] == [32, 48]
    assert res["precision"] == "fp32"
    assert "threads" in res["device"]
    assert "post-processing" in res["timed"] and "data loading excluded" in res["timed"]
    assert res["fps"] == pytest.approx(1000.0 / res["ms_per_image"], rel=1e-6)
    assert model.training  # restored


def test_benchmark_model_counts_calls_and_bf16():
    calls = []

    class Counting(TinyContractModel):
        def forward(self, batch):
            assert len(batch) == 1  # batch size 1
            calls.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return super().forward(batch)

    res = benchmark_model(Counting(), _images(2), num_warmup=3, num_iter=4, precision="bf16")
    assert len(calls) == 7 and all(c == torch.bfloat16 for c in calls)
    assert res["precision"] == "bf16"
    with pytest.raises(ValueError):
        benchmark_model(Counting(), _images(1), precision="int8")
    with pytest.raises(ValueError):
        benchmark_model(Counting(), [], num_iter=1)


def test_count_parameters_hand_count():
    model = TinyContractModel()
    # conv 3*4*3*3 + 4 bias, head 4*2, BN weight (frozen) + bias 4 + 4; BN stats and mean are buffers
    assert count_parameters(model) == 3 * 4 * 9 + 4 + 8 + 8
    shared = nn.Sequential(model.head, model.head)  # shared parameter counted once
    assert count_parameters(shared) == 8


def test_count_flops_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    gflops = count_flops(conv, torch.randn(1, 3, 16, 16))
    assert gflops * 1e9 == pytest.approx(3 * 8 * 9 * 16 * 16)


def test_count_flops_full_model_and_flops_forward():
    model = TinyContractModel()
    x = _images(1, 16, 16)
    network = 3 * 4 * 9 * 16 * 16 + 4 * 2 * 16 * 16  # the two convs (BN/ReLU/upsample: extra)
    full = count_flops(model, x) * 1e9
    assert full >= network

    class WithFlopsForward(TinyContractModel):
        def flops_forward(self, images):
            return self.head(torch.relu(self.conv(images)))

    m2 = WithFlopsForward()
    assert count_flops(m2, x) * 1e9 == pytest.approx(network)
    assert count_flops(m2, torch.randn(1, 3, 16, 16)) * 1e9 == pytest.approx(network)
