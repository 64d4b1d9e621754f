"""Engine: LR schedule, parameter groups (merged), gradient clipping, non-finite detection, atomic
checkpoints, evaluation of every test dataset keyed by name (evaluators built once), the logged
LR, a real-data training run whose loss falls, resume == uninterrupted, DDP (2 CPU processes,
gloo)."""
import copy
import csv
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import sparseinst  # noqa: F401
from instseg.config import get_cfg, setup_cfg
from instseg.data import DatasetCatalog, DatasetMapper, MetadataCatalog, annotations_to_masks, make_smoke_dataset, register_coco_instances
from instseg.engine import build_lr_lambda, build_optimizer, build_trainer, evaluate, get_param_groups, train
from instseg.engine.callbacks import AtomicCheckpointIO
from instseg.engine.module import InstSegDataModule, InstSegModule, check_finite_losses
from instseg.engine.optim import clip_gradients
from instseg.evaluation import COCOEvaluator
from instseg.modeling.registry import META_ARCH_REGISTRY

REPO = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO / "tools" / "train_net.py"


def test_lr_lambda_warmup_and_steps():
    cfg = get_cfg()
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.WARMUP_FACTOR = 10, 0.1
    cfg.SOLVER.STEPS, cfg.SOLVER.GAMMA = (20, 30), 0.1
    f = build_lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.1 * 0.5 + 0.5)  # linear from 0.1 to 1
    assert f(10) == pytest.approx(1.0) and f(19) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.1) and f(30) == pytest.approx(0.01)


def _detectron2_lr_multiplier(it, max_iter, steps, gamma, warmup_iters, warmup_factor, method="linear"):
    """Detectron2's LR multiplier at iteration ``it``, written out from its code with no fvcore:
    ``build_lr_scheduler`` (MultiStepParamScheduler(values=gamma**k, milestones=STEPS <= MAX_ITER,
    num_updates=MAX_ITER) under WarmupParamScheduler(factor, min(WARMUP_ITERS / MAX_ITER, 1))) and
    ``LRMultiplier`` (scheduler(it / MAX_ITER)); fvcore's WHERE_EPSILON is 1e-6."""
    import bisect

    eps = 1e-6
    steps = [x for x in steps if x <= max_iter]

    def multistep(where):
        return gamma ** bisect.bisect_right(steps, int((where + eps) * max_iter))

    length = min(warmup_iters / max_iter, 1.0)
    where = it / max_iter
    if where + eps > length:  # CompositeParamScheduler: past the warm-up, main schedule, "fixed"
        return multistep(where)
    start, end = warmup_factor * multistep(0.0), multistep(length)
    if method == "constant":
        return start
    w = where / length  # "rescaled"
    return end * w + start * (1 - w)


def _old_lr_multiplier(it, steps, gamma, warmup_iters, warmup_factor):
    """The rule before Detectron2's (warm-up factor times the current step factor)."""
    import bisect

    f = gamma ** bisect.bisect_right(sorted(steps), it)
    if it < warmup_iters:
        a = it / warmup_iters
        f *= warmup_factor * (1 - a) + a
    return f


@pytest.mark.parametrize(
    "warmup_iters, max_iter, steps",
    [(1000, 600, (450,)), (100, 200, (50,)), (50, 600, (450,)), (0, 300, (100, 200)), (1000, 90000, (60000, 80000))],
)
@pytest.mark.parametrize("method", ["linear", "constant"])
def test_lr_schedule_is_detectron2s_at_every_iteration(warmup_iters, max_iter, steps, method):
    cfg = get_cfg()
    s = cfg.SOLVER
    s.WARMUP_ITERS, s.MAX_ITER, s.STEPS, s.WARMUP_METHOD = warmup_iters, max_iter, steps, method
    s.BASE_LR, s.WARMUP_FACTOR, s.GAMMA = 2e-4, 1e-3, 0.1
    f = build_lr_lambda(cfg)
    for it in range(max_iter + 1):
        ref = _detectron2_lr_multiplier(it, max_iter, steps, 0.1, warmup_iters, 1e-3, method)
        assert f(it) == pytest.approx(ref, rel=1e-12, abs=0), it


def test_lr_warmup_capped_at_max_iter_and_ends_at_the_schedules_value():
    def lrs(warmup_iters, max_iter, steps):
        cfg = get_cfg()
        s = cfg.SOLVER
        s.WARMUP_ITERS, s.MAX_ITER, s.STEPS = warmup_iters, max_iter, steps
        s.BASE_LR, s.WARMUP_FACTOR, s.GAMMA = 2e-4, 1e-3, 0.1
        f = build_lr_lambda(cfg)
        return [2e-4 * f(it) for it in range(max_iter + 1)]

    # (a) warm-up longer than the run: one linear ramp over all of it, from 2e-7 to the value at
    # MAX_ITER (2e-5, after the step at 450); no drop at 450 (the old rule: up to 9e-5, down to 9e-6)
    a = lrs(1000, 600, (450,))
    assert a[0] == pytest.approx(2e-7) and a[600] == pytest.approx(2e-5) and a[599] == pytest.approx(2e-5, rel=2e-3)
    assert all(x < y for x, y in zip(a, a[1:]))
    assert max(a) == pytest.approx(2e-5)
    assert 2e-4 * _old_lr_multiplier(449, (450,), 0.1, 1000, 1e-3) == pytest.approx(8.991e-5, rel=1e-4)
    # (b) a step inside the warm-up: the ramp goes to the value after the step (2e-5 at 100)
    b = lrs(100, 200, (50,))
    assert b[49] == pytest.approx(2e-4 * (0.1 * 0.49 + 1e-3 * 0.51)) and b[49] == pytest.approx(9.9e-6, rel=1e-3)
    assert b[100] == pytest.approx(2e-5) and b[199] == pytest.approx(2e-5)
    assert 2e-4 * _old_lr_multiplier(49, (50,), 0.1, 100, 1e-3) == pytest.approx(9.81e-5, rel=1e-4)
    # (c) warm-up over before the first step: the same curve as the old rule
    c = lrs(50, 600, (450,))
    for it in range(601):
        assert c[it] == pytest.approx(2e-4 * _old_lr_multiplier(it, (450,), 0.1, 50, 1e-3), rel=1e-12), it
    assert c[0] == pytest.approx(2e-7) and c[50] == pytest.approx(2e-4) and c[450] == pytest.approx(2e-5)


def test_lr_steps_at_or_after_max_iter_ignored_and_bad_config_rejected():
    cfg = get_cfg()
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 10, 100, (50, 100, 150)
    f = build_lr_lambda(cfg)  # 100 and 150 are never reached
    assert f(99) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    for key, value in (("MAX_ITER", 0), ("WARMUP_METHOD", "cosine"), ("STEPS", (50, 50))):
        bad = cfg.clone()
        setattr(bad.SOLVER, key, value)
        with pytest.raises(ValueError):
            build_lr_lambda(bad)


def test_lr_scheduler_state_resumes_to_the_same_lr():
    """LambdaLR's state (what Lightning checkpoints) stores no schedule; rebuilt from the same
    config and loaded, it continues with the uninterrupted run's LRs."""
    cfg = get_cfg()
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 30, 20, (10,)  # warm-up capped

    def sched():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, build_lr_lambda(cfg))

    opt, s = sched()
    full = []
    for _ in range(20):
        full.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    opt, s = sched()
    for _ in range(7):
        opt.step()
        s.step()
    state, opt_state = s.state_dict(), opt.state_dict()
    assert state["lr_lambdas"] == [None]
    opt, s = sched()
    opt.load_state_dict(opt_state)
    s.load_state_dict(state)
    resumed = []
    for _ in range(13):
        resumed.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert resumed == pytest.approx(full[7:], rel=1e-12)


def test_amp_precision_fp16_on_cpu_trains_in_float32(caplog):
    """SOLVER.AMP -> Lightning precision: fp16 AMP on a CPU is float32 (as Detectron2's CUDA-only
    autocast), with a warning; bf16 stays on any device; fp16 on CUDA is 16-mixed."""
    import logging

    from instseg.engine.launch import _precision

    cfg = get_cfg()
    assert _precision(cfg) == "32-true"  # AMP off by default
    cfg.SOLVER.AMP.ENABLED = True
    cfg.MODEL.DEVICE = "cpu"
    with caplog.at_level(logging.WARNING, logger="instseg"):
        assert _precision(cfg) == "32-true"
    assert "float32" in caplog.text and "bf16" in caplog.text
    cfg.SOLVER.AMP.PRECISION = "bf16"
    assert _precision(cfg) == "bf16-mixed"
    cfg.MODEL.DEVICE = "cuda"
    assert _precision(cfg) == "bf16-mixed"
    cfg.SOLVER.AMP.PRECISION = "FP16"
    assert _precision(cfg) == "16-mixed"
    cfg.MODEL.DEVICE = ""  # auto: the device build_trainer picks
    assert _precision(cfg) == ("16-mixed" if torch.cuda.is_available() else "32-true")
    assert _precision(cfg, "cpu") == "32-true"
    cfg.SOLVER.AMP.PRECISION = "fp8"
    with pytest.raises(ValueError, match="fp16 or bf16, got 'fp8'"):
        _precision(cfg)


def test_param_groups_backbone_multiplier_and_norm_decay():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
            self.head = torch.nn.Linear(4, 2)
            self.query_embed = torch.nn.Embedding(3, 4)
            self.frozen = torch.nn.Linear(2, 2)
            self.frozen.requires_grad_(False)

    cfg = get_cfg()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.BACKBONE_MULTIPLIER = 1e-4, 0.1
    cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.WEIGHT_DECAY_NORM, cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.05, 0.0, 0.0
    groups = {g["name"]: g for g in get_param_groups(cfg, M())}
    assert "frozen.weight" not in groups
    assert groups["backbone.0.weight"]["lr"] == pytest.approx(1e-5)
    assert groups["backbone.0.weight"]["weight_decay"] == 0.05
    assert groups["backbone.1.weight"]["weight_decay"] == 0.0  # BN
    assert groups["head.weight"]["lr"] == pytest.approx(1e-4) and groups["head.weight"]["weight_decay"] == 0.05
    assert groups["query_embed.weight"]["weight_decay"] == 0.0


def test_non_finite_loss_names_iteration_and_term():
    losses = {"loss_ce": torch.tensor(1.0), "loss_dice": torch.tensor(float("nan"))}
    with pytest.raises(FloatingPointError, match=r"iteration 17: loss_dice"):
        check_finite_losses(losses, 17)
    check_finite_losses({"loss_ce": torch.tensor(1.0)}, 3)  # finite: no error


def test_unknown_config_key_is_named(tmp_path):
    with pytest.raises(KeyError, match="MODEL.SPARSE_INST.NOT_A_KEY"):
        setup_cfg(str(REPO / "configs/sparseinst/R50_giam.yaml"), ["MODEL.SPARSE_INST.NOT_A_KEY", "1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text('_BASE_: "%s"\nSOLVER:\n  BASE_LRR: 0.1\n' % (REPO / "configs/Base-SparseInst.yaml"))
    with pytest.raises(KeyError, match="SOLVER.BASE_LRR"):
        setup_cfg(str(bad))


def test_atomic_checkpoint_survives_crash_mid_write(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crashing_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left


# ------------------------------------------------------------------ optimizer groups, clipping
class _GroupsModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        self.head = torch.nn.Linear(4, 2)
        self.query_embed = torch.nn.Embedding(3, 4)

    def forward(self, x):
        f = self.backbone(x).mean(dim=(2, 3))
        return (self.head(f + self.query_embed.weight.sum(0)) ** 2).sum()


@pytest.mark.parametrize("optimizer", ["ADAMW", "SGD"])
def test_merged_param_groups_give_bit_identical_steps(optimizer):
    cfg = get_cfg()
    cfg.SOLVER.OPTIMIZER, cfg.SOLVER.MOMENTUM = optimizer, 0.9
    cfg.SOLVER.BASE_LR, cfg.SOLVER.BACKBONE_MULTIPLIER = 1e-2, 0.1
    cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.WEIGHT_DECAY_NORM, cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.05, 0.0, 0.0
    torch.manual_seed(0)
    per_param_model = _GroupsModel()
    merged_model = copy.deepcopy(per_param_model)
    per_param_groups = get_param_groups(cfg, per_param_model)
    if optimizer == "ADAMW":
        ref = torch.optim.AdamW(per_param_groups, lr=cfg.SOLVER.BASE_LR)
    else:
        ref = torch.optim.SGD(per_param_groups, lr=cfg.SOLVER.BASE_LR, momentum=0.9)
    opt = build_optimizer(cfg, merged_model)
    # (1e-3, .05) backbone conv w+b; (1e-3, 0) backbone BN w+b; (1e-2, .05) head w+b; (1e-2, 0) embedding
    pairs = {(g["lr"], g["weight_decay"]) for g in per_param_groups}
    assert len(pairs) == 4 and len(opt.param_groups) == 4 and len(ref.param_groups) == 7
    assert {(g["lr"], g["weight_decay"]) for g in opt.param_groups} == pairs
    assert sum(len(g["params"]) for g in opt.param_groups) == 7
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for model, o in ((per_param_model, ref), (merged_model, opt)):
            o.zero_grad()
            model(x).backward()
            o.step()
    for (name, a), (_, b) in zip(per_param_model.named_parameters(), merged_model.named_parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(per_param_model.head.weight, _GroupsModel().head.weight)  # it did move


def _clip_cfg(kind, value, norm_type=2.0):
    cfg = get_cfg()
    c = cfg.SOLVER.CLIP_GRADIENTS
    c.ENABLED, c.CLIP_TYPE, c.CLIP_VALUE, c.NORM_TYPE = True, kind, value, norm_type
    return cfg


def _params_with_grads():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])  # 2-norm 13, inf-norm 12
    return a, b


@pytest.mark.parametrize("kind,norm_type,expected_a,expected_b", [
    ("norm", 2.0, [1.5, 2.0], [6.0]),                        # x 6.5/13
    ("norm", float("inf"), [3 * 6.5 / 12, 4 * 6.5 / 12], [6.5]),  # x 6.5/12
    ("norm", 1.0, [3 * 6.5 / 19, 4 * 6.5 / 19], [12 * 6.5 / 19]),  # x 6.5/19
    ("value", 2.0, [3.0, 4.0], [6.5]),                       # each element clamped to 6.5
])
def test_clip_gradients_hand_computed(kind, norm_type, expected_a, expected_b):
    a, b = _params_with_grads()
    clip_gradients([a, b], _clip_cfg(kind, 6.5, norm_type).SOLVER.CLIP_GRADIENTS)
    assert a.grad.tolist() == pytest.approx(expected_a, rel=1e-5)
    assert b.grad.tolist() == pytest.approx(expected_b, rel=1e-5)


def test_clip_gradients_disabled_and_unknown_type():
    a, b = _params_with_grads()
    cfg = _clip_cfg("norm", 1.0)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    clip_gradients([a, b], cfg.SOLVER.CLIP_GRADIENTS)
    assert a.grad.tolist() == [3.0, 4.0] and b.grad.tolist() == [12.0]
    with pytest.raises(ValueError, match="CLIP_TYPE"):
        clip_gradients([a, b], _clip_cfg("full_model", 1.0).SOLVER.CLIP_GRADIENTS)


def test_mask_format_other_than_bitmask_is_an_error():
    cfg = get_cfg()
    DatasetMapper(cfg, is_train=True)  # "bitmask": fine
    cfg.INPUT.MASK_FORMAT = "polygon"
    with pytest.raises(ValueError, match=r"INPUT\.MASK_FORMAT.*rasterized to bitmasks at load time"):
        DatasetMapper(cfg, is_train=True)
    assert "VERSION" not in get_cfg()  # the unread key is gone


# ------------------------------------------------------------------ engine on a tiny model
_TINY_ARCH = "_EngineTestTinyArch"  # the class name (fvcore registries key by __name__)
_ORACLE = {}  # file_name -> (labels, masks): what _EngineTestTinyArch predicts for that image


class _EngineTestTinyArch(torch.nn.Module):
    """Four scalars (``backbone`` gets the backbone LR). Training: a quadratic loss of the image
    mean. Eval: the ground truth of the images in ``_ORACLE`` (score 1), nothing elsewhere."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = torch.nn.Linear(1, 1)
        self.head = torch.nn.Linear(1, 1)

    def forward(self, batch):
        if self.training:
            x = torch.stack([b["image"].float().mean() / 255 for b in batch]).view(-1, 1)
            return {"loss_tiny": (self.head(self.backbone(x)) - 3).pow(2).mean()}
        outs = []
        for b in batch:
            labels, masks = _ORACLE.get(b["file_name"], (torch.zeros(0, dtype=torch.int64),
                                                         torch.zeros(0, b["height"], b["width"], dtype=torch.bool)))
            outs.append({"scores": torch.ones(len(labels)), "labels": labels, "masks": masks})
        return outs


if _TINY_ARCH not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(_EngineTestTinyArch)


def _ground_truth(name):
    out = {}
    for d in DatasetCatalog.get(name):
        annos = d["annotations"]
        out[d["file_name"]] = (torch.tensor([a["category_id"] for a in annos], dtype=torch.int64),
                               torch.from_numpy(annotations_to_masks(annos, d["height"], d["width"])))
    return out


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two small generated COCO datasets (3 images of 64x64 each), registered under unique names."""
    root = tmp_path_factory.mktemp("engine_sets")
    files = make_smoke_dataset(root, num_images=3, image_size=(64, 64), splits=("a", "b"), image_format="png")
    names = []
    for split in ("a", "b"):
        name = f"eng_{split}_{uuid.uuid4().hex[:6]}"
        register_coco_instances(name, files[split]["json_file"], files[split]["image_root"])
        names.append(name)
    yield names
    for n in names:
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


@pytest.fixture
def oracle():
    _ORACLE.clear()
    yield _ORACLE
    _ORACLE.clear()


def _tiny_cfg(out, train=(), test=(), max_iter=2):
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.NUM_CLASSES, cfg.MODEL.DEVICE = _TINY_ARCH, 3, "cpu"
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = tuple(train), tuple(test)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 64
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 64
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SOLVER.CHECKPOINT_PERIOD = 1, max_iter, 0
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.STEPS = 0, ()
    cfg.SEED, cfg.LOG_PERIOD, cfg.OUTPUT_DIR = 0, 1, str(out)
    return cfg


def test_evaluate_every_test_dataset_keyed_by_name(two_sets, oracle, tmp_path):
    a, b = two_sets
    oracle.update(_ground_truth(a))  # perfect on a, nothing predicted on b
    results = evaluate(_tiny_cfg(tmp_path, test=(a, b)), per_category=True)
    assert list(results) == [a, b]
    for task in ("segm", "bbox"):
        assert results[a][task]["AP"] == pytest.approx(100.0)
        assert results[b][task]["AP"] == 0.0
    assert any(k.startswith("AP-") for k in results[a]["segm"])  # per_category reached the evaluator
    n_gt = sum(len(labels) for labels, _ in oracle.values())
    preds_a = json.loads((tmp_path / "inference" / a / "coco_instances_results.json").read_text())
    preds_b = json.loads((tmp_path / "inference" / b / "coco_instances_results.json").read_text())
    assert len(preds_a) == n_gt > 0 and preds_b == []
    per_set = json.loads((tmp_path / "inference" / a / "metrics.json").read_text())
    assert per_set["segm"]["AP"] == pytest.approx(100.0)
    combined = json.loads((tmp_path / "metrics.json").read_text())
    assert list(combined) == [a, b] and combined[b]["segm"]["AP"] == 0.0


def test_evaluators_built_once_and_reset_between_validations(two_sets, oracle, tmp_path, monkeypatch):
    a, b = two_sets
    built = []
    init = COCOEvaluator.__init__

    def counting_init(self, json_file, *args, **kwargs):
        built.append(json_file)
        init(self, json_file, *args, **kwargs)

    monkeypatch.setattr(COCOEvaluator, "__init__", counting_init)
    cfg = _tiny_cfg(tmp_path, test=(a, b))
    module, data, trainer = InstSegModule(cfg), InstSegDataModule(cfg), build_trainer(cfg)
    trainer.limit_val_batches = 1.0
    trainer.validate(module, datamodule=data, verbose=False)  # nothing predicted: AP 0 on both
    assert module.eval_results[a]["segm"]["AP"] == 0.0 and module.eval_results[b]["segm"]["AP"] == 0.0
    oracle.update(_ground_truth(a))
    trainer.validate(module, datamodule=data, verbose=False)
    # stale predictions of the first validation would win (first occurrence of an image id)
    assert module.eval_results[a]["segm"]["AP"] == pytest.approx(100.0)
    assert module.eval_results[b]["segm"]["AP"] == 0.0
    assert len(built) == 2 and built[0] != built[1]  # one evaluator per dataset, built once
    m = trainer.callback_metrics
    assert float(m[f"{a}/segm/AP"]) == pytest.approx(100.0) and float(m[f"{a}/bbox/AP"]) == pytest.approx(100.0)
    assert float(m[f"{b}/segm/AP"]) == 0.0


def test_train_returns_results_keyed_by_dataset_and_clips_with_cfg(two_sets, oracle, tmp_path, monkeypatch):
    import instseg.engine.module as module_mod

    a, b = two_sets
    oracle.update(_ground_truth(b))
    cfg = _tiny_cfg(tmp_path, train=(a,), test=(a, b), max_iter=3)
    c = cfg.SOLVER.CLIP_GRADIENTS
    c.ENABLED, c.CLIP_TYPE, c.CLIP_VALUE, c.NORM_TYPE = True, "norm", 1e-3, float("inf")
    norms = []

    def recording_clip(params, clip_cfg):
        params = list(params)
        grads = [p.grad for p in params if p.grad is not None]
        norm2_before = float(torch.cat([g.flatten() for g in grads]).norm())
        clip_gradients(params, clip_cfg)
        norms.append((norm2_before, max(float(g.abs().max()) for g in grads), float(torch.cat([g.flatten() for g in grads]).norm())))

    monkeypatch.setattr(module_mod, "clip_gradients", recording_clip)
    results = train(cfg)
    assert list(results) == [a, b]
    assert results[a]["segm"]["AP"] == 0.0 and results[b]["segm"]["AP"] == pytest.approx(100.0)
    assert len(norms) == 3  # once per step
    for before, max_abs, norm2 in norms:
        # clipped by the inf-norm (max-abs) to CLIP_VALUE: the 2-norm stays above it (2-norm clipping
        # would bring the 2-norm, not the max-abs, to 1e-3)
        assert before > 1e-2 and max_abs == pytest.approx(1e-3, rel=1e-4) and norm2 > 1.05e-3


class _RecordLR(Callback):
    def __init__(self):
        self.logged, self.group_lrs = {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the iteration just done
        self.logged[step] = float(trainer.callback_metrics["train/lr"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        opt = trainer.optimizers[0]
        self.group_lrs[trainer.global_step] = [g["lr"] for g in opt.param_groups]


def test_logged_lr_is_base_lr_times_multiplier_also_after_resume(two_sets, tmp_path):
    a, _ = two_sets

    def cfg_for(max_iter):
        cfg = _tiny_cfg(tmp_path, train=(a,), max_iter=max_iter)
        cfg.SOLVER.BASE_LR, cfg.SOLVER.BACKBONE_MULTIPLIER = 0.01, 0.1
        cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.WARMUP_FACTOR = 4, 0.1
        cfg.SOLVER.STEPS, cfg.SOLVER.GAMMA, cfg.SOLVER.CHECKPOINT_PERIOD = (3,), 0.5, 3
        return cfg

    # each run follows its own config's schedule (the warm-up of 4 is capped at MAX_ITER=3 in the first)
    mult3, mult5 = build_lr_lambda(cfg_for(3)), build_lr_lambda(cfg_for(5))
    rec = _RecordLR()
    cfg = cfg_for(3)
    build_trainer(cfg, extra_callbacks=[rec]).fit(InstSegModule(cfg), datamodule=InstSegDataModule(cfg))
    rec2 = _RecordLR()
    cfg2 = cfg_for(5)
    build_trainer(cfg2, extra_callbacks=[rec2]).fit(InstSegModule(cfg2), datamodule=InstSegDataModule(cfg2),
                                                     ckpt_path=str(tmp_path / "last.ckpt"))
    assert sorted(rec.logged) == [0, 1, 2] and sorted(rec2.logged) == [3, 4]
    for r, mult in ((rec, mult3), (rec2, mult5)):
        for step, lr in r.logged.items():
            assert lr == pytest.approx(0.01 * mult(step), rel=1e-6), step
            # the backbone group (first) runs 10x lower, the head group at the logged LR
            assert sorted(r.group_lrs[step]) == pytest.approx(sorted([0.001 * mult(step), 0.01 * mult(step)]), rel=1e-6)
    assert mult5(3) != mult5(4) != mult3(0)  # the checked values differ from step to step


def _train_args(coco128, out, max_iter, extra=()):
    return [
        "--config-file", str(REPO / "configs/sparseinst/R50_giam.yaml"),
        "--dataset", "c128_tiny8", str(coco128 / "annotations_tiny8.json"), str(coco128 / "images"),
        "DATASETS.TRAIN", "('c128_tiny8',)", "DATASETS.TEST", "()",
        "MODEL.RESNETS.NORM", "BN", "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(max_iter), "SOLVER.WARMUP_ITERS", "5", "SOLVER.BASE_LR", "0.0001",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "DATALOADER.NUM_WORKERS", "0", "SEED", "3", "LOG_PERIOD", "1", "OUTPUT_DIR", str(out), *extra,
    ]


def _run(args, env_extra=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    p = subprocess.run([sys.executable, str(TRAIN_NET), *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _losses(out):
    """step -> total loss over every run in OUTPUT_DIR (csv/version_N, one per (resumed) run)."""
    rows = [r for f in sorted((out / "csv").glob("version_*/metrics.csv")) for r in csv.DictReader(open(f))]
    return {int(r["step"]): float(r["train/total_loss"]) for r in rows if r.get("train/total_loss")}


@pytest.mark.slow
def test_training_on_real_images_loss_falls(coco128, tmp_path):
    _run(_train_args(coco128, tmp_path, 40))
    losses = _losses(tmp_path)
    steps = sorted(losses)
    first = sum(losses[s] for s in steps[:5]) / 5
    last = sum(losses[s] for s in steps[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert (tmp_path / "model_final.ckpt").is_file() and (tmp_path / "last.ckpt").is_file()
    assert any((tmp_path / "tensorboard").iterdir())


def _weights(path):
    sd = torch.load(path, map_location="cpu", weights_only=False)
    return sd["global_step"], sd["state_dict"]


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(coco128, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    # warm-up over by the interruption: a run with MAX_ITER 3 has the 6-iteration run's first LRs
    # (the warm-up is capped at MAX_ITER, so WARMUP_ITERS 5 would give the short run its own ramp)
    extra = ["SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.WARMUP_ITERS", "3"]
    _run(_train_args(coco128, full, 6, extra))
    # "interrupted" after iteration 3: same config, stopped at 3 ...
    _run(_train_args(coco128, part, 3, extra))
    step, _ = _weights(part / "last.ckpt")
    assert step == 3
    # ... and resumed to 6
    p = _run(["--resume"] + _train_args(coco128, part, 6, extra))
    assert "Resuming from" in p.stdout and "at iteration 3" in p.stdout
    resumed_steps = sorted(_losses(part))
    assert resumed_steps[0] == 0 and resumed_steps[-1] == 5  # csv: 0-based steps 0..2 then 3..5
    s_full, w_full = _weights(full / "model_final.ckpt")
    s_part, w_part = _weights(part / "model_final.ckpt")
    assert s_full == s_part == 6
    for k in w_full:
        assert torch.allclose(w_full[k].float(), w_part[k].float(), atol=1e-5, rtol=1e-4), k
    # the per-iteration losses after the resume equal the uninterrupted run's
    lf, lp = _losses(full), _losses(part)
    for s in (3, 4, 5):
        assert lp[s] == pytest.approx(lf[s], rel=1e-4)


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_parameters_identical(coco128, tmp_path):
    _run(["--num-gpus", "2", "--dist-url", "tcp://127.0.0.1:29533"] + _train_args(coco128, tmp_path, 3))
    rec = json.loads((tmp_path / "ddp_param_checksums.json").read_text())
    assert rec["world_size"] == 2
    a, b = rec["ranks"]
    assert a == b
