"""Under DDP the logged training losses (every loss term and ``total_loss``) are the mean over the
ranks, not rank 0's local value: a 2-process gloo run on CPU of a tiny model whose losses differ by
rank (:meth:`instseg.engine.module.InstSegModule._losses_to_log`)."""
import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run as a script (Lightning's DDP launcher re-runs sys.argv in each child process).
_SCRIPT = r'''
import json, logging, os, sys
import torch
from lightning.pytorch.callbacks import Callback
from instseg.config import get_cfg
from instseg.data import make_smoke_dataset, register_coco_instances
from instseg.engine import build_trainer
from instseg.engine.module import InstSegDataModule, InstSegModule
from instseg.modeling.registry import META_ARCH_REGISTRY

out, port = sys.argv[1], sys.argv[2]
LOCAL = []  # this rank's local loss values, one dict per training step


class _DDPLossLogTinyArch(torch.nn.Module):
    """Two scalars; two loss terms of the image mean, the second scaled by (rank + 1)."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = torch.nn.Linear(1, 1)
        self.head = torch.nn.Linear(1, 1)

    def forward(self, batch):
        x = torch.stack([b["image"].float().mean() / 255 for b in batch]).view(-1, 1)
        y = self.head(self.backbone(x))
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        losses = {"loss_a": (y - 3).pow(2).mean(), "loss_b": (y.abs().mean() + 1.0) * (rank + 1)}
        LOCAL.append({k: float(v) for k, v in losses.items()} | {"total_loss": float(sum(losses.values()))})
        return losses


META_ARCH_REGISTRY.register(_DDPLossLogTinyArch)


class _Dump(Callback):
    def on_train_end(self, trainer, pl_module):
        with open(os.path.join(out, f"local_rank{trainer.global_rank}.json"), "w") as f:
            json.dump(LOCAL, f)


# one copy per process: the launcher's children re-run this script while rank 0 reads its copy
rank = os.environ.get("LOCAL_RANK", "0")
files = make_smoke_dataset(os.path.join(out, f"data{rank}"), num_images=8, image_size=(64, 64), splits=("a",), image_format="png")
register_coco_instances("ddp_loss_a", files["a"]["json_file"], files["a"]["image_root"])
cfg = get_cfg()
cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.NUM_CLASSES, cfg.MODEL.DEVICE = "_DDPLossLogTinyArch", 3, "cpu"
cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("ddp_loss_a",), ()
cfg.DATALOADER.NUM_WORKERS = 0
cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 64
cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SOLVER.CHECKPOINT_PERIOD = 2, 5, 0
cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.STEPS, cfg.SOLVER.BASE_LR = 0, (), 0.05
cfg.SEED, cfg.LOG_PERIOD, cfg.OUTPUT_DIR = 0, 2, out
text = logging.FileHandler(os.path.join(out, f"text_rank{rank}.log"))
logging.getLogger("instseg").addHandler(text)
logging.getLogger("instseg").setLevel(logging.INFO)
torch.manual_seed(0)  # the same initial weights on both ranks and in every run
trainer = build_trainer(cfg, num_gpus=2, dist_url=f"tcp://127.0.0.1:{port}", extra_callbacks=[_Dump()])
trainer.fit(InstSegModule(cfg), datamodule=InstSegDataModule(cfg))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp_loss_log(out: Path, repo: Path = REPO) -> dict:
    """Run the 2-process script with ``repo``'s code; returns the local values of each rank, the
    csv rows and the text log's ``total_loss`` values of rank 0."""
    out.mkdir(parents=True, exist_ok=True)
    script = out / "ddp_loss_log.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, str(script), str(out), str(_free_port())], capture_output=True, text=True,
                       env=env, cwd=str(repo), timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    local = [json.loads((out / f"local_rank{r}.json").read_text()) for r in (0, 1)]
    rows = [r for f in sorted((out / "csv").glob("version_*/metrics.csv")) for r in csv.DictReader(open(f))]
    csv_rows = {int(r["step"]): {k[len("train/"):]: float(v) for k, v in r.items() if k.startswith("train/") and v}
                for r in rows if r.get("train/total_loss")}
    text = {}
    for line in (out / "text_rank0.log").read_text().splitlines():
        m = re.search(r"iter: (\d+)/\d+ .*total_loss: (\S+)", line)
        if m:
            text[int(m.group(1))] = float(m.group(2))
    return {"local": local, "csv": csv_rows, "text": text}


def test_ddp_logged_losses_are_the_mean_over_ranks(tmp_path):
    res = run_ddp_loss_log(tmp_path)
    r0, r1 = res["local"]
    assert len(r0) == len(r1) == 5  # MAX_ITER steps on each rank
    # csv (log_every_n_steps = LOG_PERIOD = 2): 0-based steps 1 and 3; every term and the total
    assert sorted(res["csv"]) == [1, 3], res["csv"]
    for step, logged in res["csv"].items():
        assert set(logged) == {"loss_a", "loss_b", "total_loss", "lr"}
        for k in ("loss_a", "loss_b", "total_loss"):
            mean = (r0[step][k] + r1[step][k]) / 2
            assert logged[k] == pytest.approx(mean, rel=1e-6, abs=1e-7), (step, k)
            assert abs(r0[step][k] - r1[step][k]) > 1e-3  # discriminating: the ranks differ
    # the text log (rank 0) at iterations 1, 2, 4 (LOG_PERIOD) and 5 (the last), 4 significant digits
    assert sorted(res["text"]) == [1, 2, 4, 5], res["text"]
    for it, value in res["text"].items():
        mean = (r0[it - 1]["total_loss"] + r1[it - 1]["total_loss"]) / 2
        assert value == pytest.approx(mean, rel=1e-3), it
        assert value != pytest.approx(r0[it - 1]["total_loss"], rel=1e-2), it
