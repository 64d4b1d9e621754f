#!/usr/bin/env python
"""kill -9 acceptance experiment for checkpointing and ``--resume`` (issue 11, docs/robustness.md).

Trains one uninterrupted reference run, then the same run killed with SIGKILL ``--kills`` times
(alternately while a ``.tmp-*.ckpt`` write is in progress and at a random moment after a random
iteration), each time continued with ``--resume``. At the end it checks that the final weights
(``model_final.ckpt``: model, optimizer and scheduler state) are bit-identical to the reference's,
that no temporary file remains, and reports the largest disk use of the output folder seen (polled
every 10 ms). Prints a JSON summary (also written to ``WORK/summary.json``); exit status 1 when a
check fails.

    python tools/stress_resume.py --work /tmp/stress [--kills 6] [--max-iter 24] [--period 2] \\
        [--keep-last 2] [--seed 0] [--dataset NAME JSON IMAGE_ROOT] [--config-file F] [KEY VALUE ...]

Defaults: SparseInst R50 G-IAM (BN) on coco128-seg's ``annotations_tiny8.json`` at 64-96 px,
batch 2, ``DATALOADER.NUM_WORKERS 0`` (the data order then depends only on the RNG state the
checkpoints carry), ``OMP_NUM_THREADS=1`` (deterministic CPU reductions).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO / "tools" / "train_net.py"


def disk_use(folder: Path) -> int:
    """Bytes allocated by the files under ``folder`` (links not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def tmp_files(folder: Path):
    try:
        return [n for n in os.listdir(folder) if n.startswith(".tmp-") and n.endswith(".ckpt")]
    except FileNotFoundError:
        return []


def last_iter(log: Path) -> int:
    """The last ``iter: N/`` of a train_net stdout file (0 when none)."""
    try:
        found = re.findall(r"iter: (\d+)/\d+", log.read_text(errors="replace"))
    except FileNotFoundError:
        return 0
    return int(found[-1]) if found else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="scratch folder (ref/ and run/ are created; replaced if present)")
    p.add_argument("--kills", type=int, default=6)
    p.add_argument("--max-iter", type=int, default=24)
    p.add_argument("--period", type=int, default=2)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--config-file", default=str(REPO / "configs/sparseinst/R50_giam.yaml"))
    p.add_argument("--dataset", nargs=3, metavar=("NAME", "JSON", "IMAGE_ROOT"))
    p.add_argument("opts", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    if a.dataset is None:
        c128 = REPO.parent / "shared" / "data" / "coco128-seg"
        a.dataset = ["stress_t8", str(c128 / "annotations_tiny8.json"), str(c128 / "images")]
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(a.seed)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def cmd(out: Path, resume: bool):
        return [sys.executable, str(TRAIN_NET), *(["--resume"] if resume else []), "--config-file", a.config_file,
                "--dataset", *a.dataset, "DATASETS.TRAIN", f"('{a.dataset[0]}',)", "DATASETS.TEST", "()",
                "MODEL.RESNETS.NORM", "BN", "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2",
                "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "DATALOADER.NUM_WORKERS", "0",
                "SOLVER.WARMUP_ITERS", "2", "SEED", "3", "LOG_PERIOD", "1",
                "SOLVER.MAX_ITER", str(a.max_iter), "SOLVER.CHECKPOINT_PERIOD", str(a.period),
                "SOLVER.CHECKPOINT_KEEP_LAST", str(a.keep_last), "OUTPUT_DIR", str(out), *a.opts]

    def launch(out: Path, resume: bool, tag: str):
        log = work / f"{tag}.log"
        f = open(log, "w")
        return subprocess.Popen(cmd(out, resume), stdout=f, stderr=subprocess.STDOUT, env=env), log, f

    summary = {"kills": [], "max_iter": a.max_iter, "period": a.period, "keep_last": a.keep_last}
    t0 = time.time()
    # 1. uninterrupted reference
    ref = work / "ref"
    proc, log, f = launch(ref, False, "ref")
    ref_max = 0
    while proc.poll() is None:
        ref_max = max(ref_max, disk_use(ref))
        time.sleep(0.01)
    f.close()
    if proc.returncode != 0:
        print(log.read_text()[-3000:])
        return 1
    summary["reference_seconds"] = round(time.time() - t0, 1)
    summary["reference_max_disk_mib"] = round(ref_max / 2**20, 1)

    # 2. the killed run
    run = work / "run"
    max_disk, attempt, resume_iters = 0, 0, []
    while True:
        proc, log, f = launch(run, attempt > 0, f"run{attempt}")
        kill_no = len(summary["kills"])
        want = None
        if kill_no < a.kills:
            want = "write" if kill_no % 2 == 0 else "random"
        start_it, target, killed, seen = None, None, None, []
        skip = rng.randint(0, 2)  # mid-write: let this many writes finish first
        while proc.poll() is None:
            max_disk = max(max_disk, disk_use(run))
            it = last_iter(log)
            if start_it is None and it > 0:
                start_it = it - 1
            if want == "write" and start_it is not None:
                tmps = [n for n in tmp_files(run) if "link" not in n]
                seen += [n for n in tmps if n not in seen]
                if len(seen) > skip and seen[-1] in tmps and os.path.getsize(run / seen[-1]) > 0:
                    time.sleep(rng.uniform(0.0, 0.15))
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = {"kind": "mid-write", "tmp_seen": seen[-1], "writes_let_finish": skip}
            elif want == "random" and start_it is not None:
                if target is None:
                    target = min(start_it + rng.randint(2, 6), a.max_iter - 1)
                if it >= target:
                    time.sleep(rng.uniform(0.0, 2.0))
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = {"kind": "random", "after_iter": it}
            if killed:
                proc.wait()
                break
            time.sleep(0.01)
        f.close()
        text = log.read_text(errors="replace")
        m = re.search(r"Resuming from (\S+) at iteration (\d+)", text)
        if attempt > 0:
            resume_iters.append(int(m.group(2)) if m else 0)
        if killed:
            left = tmp_files(run)
            killed.update(attempt=attempt, last_logged_iter=last_iter(log), tmp_left_after_kill=left,
                          mid_write=bool([n for n in left if "link" not in n]))
            summary["kills"].append(killed)
            attempt += 1
            continue
        if proc.returncode != 0:
            print(text[-3000:])
            return 1
        break
    max_disk = max(max_disk, disk_use(run))

    # 3. checks
    import torch

    fa = torch.load(ref / "model_final.ckpt", map_location="cpu", weights_only=False)
    fb = torch.load(run / "model_final.ckpt", map_location="cpu", weights_only=False)
    sa, sb = fa["state_dict"], fb["state_dict"]
    diff = [k for k in sa if k not in sb or not torch.equal(sa[k], sb[k])] + [k for k in sb if k not in sa]

    def flat_opt(ck):
        out = {}
        for i, st in ck["optimizer_states"][0]["state"].items():
            for k, v in st.items():
                out[f"{i}.{k}"] = v
        return out

    oa, ob = flat_opt(fa), flat_opt(fb)
    opt_diff = [k for k in oa if k not in ob or not torch.equal(torch.as_tensor(oa[k]), torch.as_tensor(ob[k]))]
    summary.update(
        num_kills=len(summary["kills"]),
        mid_write_kills=sum(k["mid_write"] for k in summary["kills"]),
        resume_iterations=resume_iters,
        final_step=[fa["global_step"], fb["global_step"]],
        tensors_compared=len(sa),
        weights_bit_identical=not diff,
        differing_tensors=diff[:10],
        optimizer_state_bit_identical=not opt_diff,
        tmp_files_left=tmp_files(run),
        checkpoint_files_left=sorted(n for n in os.listdir(run) if n.endswith(".ckpt")),
        last_ckpt_is_link=os.path.islink(run / "last.ckpt"),
        max_disk_mib=round(max_disk / 2**20, 1),
        checkpoint_mib=round(os.path.getsize(run / "model_final.ckpt") / 2**20, 1),
        total_seconds=round(time.time() - t0, 1),
    )
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    ok = (summary["weights_bit_identical"] and summary["optimizer_state_bit_identical"] and not summary["tmp_files_left"]
          and summary["num_kills"] >= a.kills)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
