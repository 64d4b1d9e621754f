"""The main job: train SparseInst, evaluate COCO mask AP and time it, in one command.

    instseg-quickstart                      # generated smoke_shapes dataset (no download)
    instseg-quickstart --dataset NAME JSON_FILE IMAGE_ROOT [--val-dataset NAME JSON ROOT]
    instseg-quickstart --config-file F [KEY VALUE ...]   # any config, any overrides
    python tools/quickstart.py ...          # the same, from a source checkout

Steps: (1) train with ``--config-file`` (default: the packaged copy of the repository's
``configs/sparseinst/quickstart_R18.yaml``: a small SparseInst, R-18 G-IAM from scratch at a small
size, 1200 iterations of batch 8, ``SEED 0``: mask AP 53.5 on ``smoke_shapes_val`` after about
3.5 minutes of training on an idle 2-core CPU; see the config's header for the other seeds),
(2) COCO evaluation of the final weights on the test set (the ``--val-dataset``, else the training
set, else ``smoke_shapes_val``), (3) timing at batch 1 on test images, as evaluation feeds them
(pre-processing + network + post-processing), with parameters and FLOPs, (4) pictures: the
ground truth next to the prediction for the first ``--num-overlays`` test images
(``OUTPUT_DIR/overlays/<image>.png`` and all of them in one ``OUTPUT_DIR/overlays.png``) and the
loss curve that every training run writes (``OUTPUT_DIR/loss_curve.png``).
Everything lands in OUTPUT_DIR (relative to the current directory, default
``output/quickstart``); a summary is printed and written to ``quickstart_summary.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

__all__ = ["DEFAULT_CONFIG", "default_config_file", "results_by_dataset", "write_overlays", "get_parser", "run",
           "main"]

# Relative to the packaged configs folder (instseg/tools/configs), as under the repository's configs/.
DEFAULT_CONFIG = "sparseinst/quickstart_R18.yaml"
_TASKS = ("segm", "bbox")


def default_config_file() -> str:
    """The packaged copy of ``configs/sparseinst/quickstart_R18.yaml`` (and its ``_BASE_``
    chain), present in an installed package as in a source checkout."""
    return str(Path(__file__).resolve().parent / "configs" / DEFAULT_CONFIG)


def results_by_dataset(results, default_name: str) -> Dict[str, Dict]:
    """Evaluation results as ``{dataset_name: {"segm": {...}, "bbox": {...}}}``.

    ``train()``/``evaluate()`` return that keyed structure; the older flat ``{"segm": {...},
    "bbox": {...}}`` (one dataset) is accepted and filed under ``default_name``. ``{}`` or None
    (no test set) gives ``{}``.
    """
    if not results:
        return {}
    flat = set(results) <= set(_TASKS) and all(
        isinstance(v, dict) and not any(isinstance(x, dict) for x in v.values()) for v in results.values()
    )
    return {default_name: dict(results)} if flat else {str(k): v for k, v in results.items()}


def write_overlays(cfg, weights: str, dataset: str, out_dir: str, num: int = 4,
                   score_threshold: float = 0.5) -> List[str]:
    """Ground truth | prediction pictures of the first ``num`` images of ``dataset``.

    For each image, one PNG ``out_dir/overlays/<image stem>.png``: the image with its ground-truth
    instances (score 1) on the left and with the predictions of ``weights`` (scores
    ``>= score_threshold``, :class:`instseg.engine.Predictor`, the test-time resize) on the right,
    both drawn by :func:`instseg.utils.visualize.draw_instances` with the dataset's class names;
    then every pair stacked in ``out_dir/overlays.png``.

    Args:
        cfg: the training config (``MODEL.NUM_CLASSES`` resolved).
        weights: the checkpoint to predict with.
        dataset: a registered instance-segmentation dataset name.
        out_dir: the folder to write into (``OUTPUT_DIR``).
        num: how many images (the dataset's first ones, in its order).
        score_threshold: the lowest prediction score drawn.

    Returns:
        The written paths: the per-image PNGs, then ``overlays.png`` (``[]`` for ``num < 1``).

    Raises:
        FileNotFoundError: ``weights`` or an image is missing (named).
    """
    import cv2
    import torch

    from instseg.data import DatasetCatalog, read_image
    from instseg.data.mapper import annotations_to_masks
    from instseg.engine import Predictor
    from instseg.utils.visualize import dataset_classes_and_colors, draw_instances

    if num < 1:
        return []
    names, colors = dataset_classes_and_colors(dataset)
    predictor = Predictor(cfg, weights=weights)
    os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
    paths, rows = [], []
    for d in DatasetCatalog.get(dataset)[:num]:
        image = read_image(d["file_name"])
        h, w = image.shape[:2]
        anns = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
        gt_masks = annotations_to_masks(anns, h, w, file_name=d["file_name"]) if anns else np.zeros((0, h, w), bool)
        gt = {"masks": torch.from_numpy(np.asarray(gt_masks, dtype=bool)),
              "labels": torch.tensor([int(a["category_id"]) for a in anns], dtype=torch.int64),
              "scores": torch.ones(len(anns))}
        pred = predictor(image)
        left = draw_instances(image, gt, class_names=names, colors=colors, draw_boxes=False)
        right = draw_instances(image, pred, class_names=names, colors=colors, score_threshold=score_threshold)
        sep = np.full((h, 8, 3), 255, np.uint8)
        row = np.concatenate([left, sep, right], axis=1)
        path = os.path.join(out_dir, "overlays", os.path.splitext(os.path.basename(d["file_name"]))[0] + ".png")
        cv2.imwrite(path, cv2.cvtColor(row, cv2.COLOR_RGB2BGR))
        paths.append(path)
        rows.append(row)
    if rows:
        width = max(r.shape[1] for r in rows)
        pad = [np.pad(r, ((0, 8), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
        mosaic = os.path.join(out_dir, "overlays.png")
        cv2.imwrite(mosaic, cv2.cvtColor(np.concatenate(pad, axis=0), cv2.COLOR_RGB2BGR))
        paths.append(mosaic)
    return paths


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="", metavar="FILE",
                   help=f"config to train (default: the packaged {DEFAULT_CONFIG})")
    p.add_argument("--dataset", nargs=3, metavar=("NAME", "JSON_FILE", "IMAGE_ROOT"), help="COCO-format training set")
    p.add_argument("--val-dataset", nargs=3, metavar=("NAME", "JSON_FILE", "IMAGE_ROOT"), help="COCO-format test set")
    p.add_argument("--num-bench", type=int, default=20, help="timed iterations (after 5 warm-up ones)")
    p.add_argument("--num-overlays", type=int, default=4,
                   help="test images drawn as ground truth | prediction into OUTPUT_DIR/overlays (default 4; 0: none)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoints of an earlier quick start in OUTPUT_DIR (refused otherwise)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def _ap(metrics: Dict, key: str) -> float:
    v = (metrics or {}).get(key)
    return float(v) if isinstance(v, (int, float)) else math.nan


def run(argv=None) -> Dict:
    """Parse ``argv``, train, evaluate, time; print the summary and return it."""
    p = get_parser()
    args = p.parse_args(argv)
    config_file = args.config_file or default_config_file()
    if not os.path.isfile(config_file):
        p.error(f"config file not found: {config_file} (give an existing one with --config-file; "
                f"without it the packaged {DEFAULT_CONFIG} is used)")
    if args.num_bench < 1:
        p.error("--num-bench must be >= 1")

    from instseg.engine import default_setup, train
    from instseg.engine.launch import setup_cfg_from_args
    from instseg.evaluation.timing import benchmark_from_config

    opts = list(args.opts or [])
    datasets = []
    if args.dataset:
        test = args.val_dataset or args.dataset
        datasets = [list(args.dataset)] + ([list(args.val_dataset)] if args.val_dataset else [])
        opts = ["DATASETS.TRAIN", f"('{args.dataset[0]}',)", "DATASETS.TEST", f"('{test[0]}',)"] + opts
    cfg_args = argparse.Namespace(config_file=config_file, opts=opts, dataset=datasets or None)
    cfg = setup_cfg_from_args(cfg_args)
    # a second quick start into the same OUTPUT_DIR stops before writing anything unless --overwrite
    default_setup(cfg, argparse.Namespace(resume=False, overwrite=args.overwrite, config_file=config_file, opts=opts))

    # 1. train (the final evaluation of train() is step 2)
    t0 = time.perf_counter()
    results = results_by_dataset(train(cfg, overwrite=args.overwrite), cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "")
    train_eval_s = time.perf_counter() - t0
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.ckpt")

    # 3. timing on real test images, mapped as evaluation maps them, at the test size
    bench_set = (list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN))[0]
    bench = benchmark_from_config(cfg, dataset=bench_set, num_images=10, num_warmup=5,
                                  num_iter=args.num_bench, weights=weights)
    timing = {k: bench[k] for k in ("fps", "ms_per_image", "ms_std", "ms_median", "num_warmup", "num_iter",
                                    "batch_size", "device", "precision", "channels_last", "input_size",
                                    "input_size_note", "timed", "torch", "max_memory_mb", "images")
              if k in bench}
    # 4. pictures: ground truth | prediction, and the loss curve train() wrote
    overlays = write_overlays(cfg, weights, bench_set, cfg.OUTPUT_DIR, num=args.num_overlays)
    loss_curve = os.path.join(cfg.OUTPUT_DIR, "loss_curve.png")
    summary = {
        "config": config_file,
        "train_and_eval_seconds": train_eval_s,
        "overlays": overlays,
        "loss_curve": loss_curve if os.path.isfile(loss_curve) else None,
        "train": list(cfg.DATASETS.TRAIN),
        "test": list(cfg.DATASETS.TEST),
        "iterations": cfg.SOLVER.MAX_ITER,
        "weights": weights,
        "coco": results,
        "timing": timing,
        "parameters": bench["params"],
        "gflops": bench["gflops"],
    }
    with open(os.path.join(cfg.OUTPUT_DIR, "quickstart_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print("\n==== quickstart summary ====")
    print(f"trained {cfg.MODEL.META_ARCHITECTURE} for {cfg.SOLVER.MAX_ITER} iterations on {list(cfg.DATASETS.TRAIN)}"
          f" in {train_eval_s:.0f} s (model build, training and the final evaluation)")
    for name, res in results.items():
        segm, bbox = res.get("segm", {}), res.get("bbox", {})
        print(f"COCO on {name}: mask AP {_ap(segm, 'AP'):.2f}  AP50 {_ap(segm, 'AP50'):.2f}"
              f"  box AP {_ap(bbox, 'AP'):.2f}")
    if not results:
        print("COCO: no test set (DATASETS.TEST is empty)")
    print(f"speed ({timing['device']}, {timing['precision']}, batch 1, input {timing['input_size']}): "
          f"{timing['fps']:.2f} FPS, {timing['ms_per_image']:.1f} ms/image ({timing['timed']})")
    gflops = "n/a" if bench["gflops"] is None else f"{bench['gflops']:.2f}"
    print(f"parameters {summary['parameters']:,}  GFLOPs {gflops}")
    if overlays:
        print(f"ground truth | prediction: {overlays[-1]} ({len(overlays) - 1} images, also in "
              f"{os.path.join(cfg.OUTPUT_DIR, 'overlays')})")
    if summary["loss_curve"]:
        print(f"loss curve: {loss_curve}")
    print(f"outputs in {cfg.OUTPUT_DIR}")
    return summary


def main(argv=None) -> int:
    """Console script ``instseg-quickstart``: :func:`run`, exit status 0."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
