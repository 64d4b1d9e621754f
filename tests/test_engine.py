"""Engine: LR schedule, parameter groups, non-finite detection, atomic checkpoints, a real-data
training run whose loss falls, resume == uninterrupted, DDP (2 CPU processes, gloo)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparseinst  # noqa: F401
from instseg.config import get_cfg, setup_cfg
from instseg.engine import build_lr_lambda, get_param_groups
from instseg.engine.callbacks import AtomicCheckpointIO
from instseg.engine.module import check_finite_losses

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
    _run(_train_args(coco128, full, 6, ["SOLVER.CHECKPOINT_PERIOD", "3"]))
    # "interrupted" after iteration 3: same config, stopped at 3 ...
    _run(_train_args(coco128, part, 3, ["SOLVER.CHECKPOINT_PERIOD", "3"]))
    step, _ = _weights(part / "last.ckpt")
    assert step == 3
    # ... and resumed to 6
    p = _run(["--resume"] + _train_args(coco128, part, 6, ["SOLVER.CHECKPOINT_PERIOD", "3"]))
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
