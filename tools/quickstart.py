#!/usr/bin/env python
"""The main job: train SparseInst, evaluate COCO mask AP and time it, in one command.

    python tools/quickstart.py                       # generated smoke_shapes dataset (no download)
    python tools/quickstart.py --dataset NAME JSON_FILE IMAGE_ROOT [--val-dataset NAME JSON ROOT]
    python tools/quickstart.py --config-file F [KEY VALUE ...]   # any config, any overrides

Steps: (1) train with ``--config-file`` (default ``configs/sparseinst/smoke_R50_scratch.yaml``:
R-50 G-IAM from scratch at a small size), (2) COCO evaluation of the final weights on the test
set (the ``--val-dataset``, else the training set, else ``smoke_shapes_val``), (3) timing at batch
1 on test images (pre-processing + network + post-processing) with parameters and FLOPs.
Everything lands in OUTPUT_DIR; a summary is printed and written to ``quickstart_summary.json``.
"""
import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from instseg.config import setup_cfg  # noqa: E402
from instseg.data import DatasetMapper, DatasetCatalog, register_coco_instances, resolve_num_classes  # noqa: E402
from instseg.engine import default_setup, evaluate, train  # noqa: E402
from instseg.engine.models import import_model_packages  # noqa: E402
from instseg.evaluation import benchmark_model, count_flops, count_parameters  # noqa: E402
from instseg.modeling import build_model  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=os.path.join(REPO, "configs/sparseinst/smoke_R50_scratch.yaml"))
    p.add_argument("--dataset", nargs=3, metavar=("NAME", "JSON_FILE", "IMAGE_ROOT"), help="COCO-format training set")
    p.add_argument("--val-dataset", nargs=3, metavar=("NAME", "JSON_FILE", "IMAGE_ROOT"), help="COCO-format test set")
    p.add_argument("--num-bench", type=int, default=20, help="timed iterations (after 5 warm-up ones)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)

    import_model_packages()
    opts = list(args.opts or [])
    if args.dataset:
        register_coco_instances(*args.dataset)
        test = args.val_dataset or args.dataset
        if args.val_dataset:
            register_coco_instances(*args.val_dataset)
        opts = ["DATASETS.TRAIN", f"('{args.dataset[0]}',)", "DATASETS.TEST", f"('{test[0]}',)"] + opts
    cfg = setup_cfg(args.config_file, opts, freeze=False)
    resolve_num_classes(cfg)
    cfg.freeze()
    default_setup(cfg)

    # 1. train (the final evaluation of train() is step 2)
    results = train(cfg)
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.ckpt")

    # 3. timing on real test images at the test size
    model = build_model(cfg)
    from instseg.checkpoint import load_checkpoint

    load_checkpoint(model, weights)
    model.eval()
    mapper = DatasetMapper(cfg, is_train=False)
    dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])[: max(1, min(len(DatasetCatalog.get(cfg.DATASETS.TEST[0])), 10))]
    inputs = [mapper(d) for d in dicts]
    timing = benchmark_model(model, inputs, num_warmup=5, num_iter=args.num_bench)
    gflops = count_flops(model, inputs[0])
    summary = {
        "config": args.config_file,
        "train": list(cfg.DATASETS.TRAIN),
        "test": list(cfg.DATASETS.TEST),
        "iterations": cfg.SOLVER.MAX_ITER,
        "weights": weights,
        "coco": results,
        "timing": timing,
        "parameters": count_parameters(model),
        "gflops": gflops,
    }
    with open(os.path.join(cfg.OUTPUT_DIR, "quickstart_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    segm, bbox = results.get("segm", {}), results.get("bbox", {})
    print("\n==== quickstart summary ====")
    print(f"trained {cfg.MODEL.META_ARCHITECTURE} for {cfg.SOLVER.MAX_ITER} iterations on {list(cfg.DATASETS.TRAIN)}")
    print(f"COCO on {cfg.DATASETS.TEST[0]}: mask AP {segm.get('AP', float('nan')):.2f}  AP50 {segm.get('AP50', float('nan')):.2f}"
          f"  box AP {bbox.get('AP', float('nan')):.2f}")
    print(f"speed ({timing['device']}, {timing['precision']}, batch 1, input {timing['input_size']}): "
          f"{timing['fps']:.2f} FPS, {timing['ms_per_image']:.1f} ms/image ({timing['timed']})")
    print(f"parameters {summary['parameters']:,}  GFLOPs {gflops:.2f}")
    print(f"outputs in {cfg.OUTPUT_DIR}")
    return summary


if __name__ == "__main__":
    main()
