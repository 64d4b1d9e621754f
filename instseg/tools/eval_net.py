"""COCO evaluation (segm and bbox AP, AP50/75/S/M/L) of a trained model.

    instseg-eval --config-file F [--dataset NAME JSON ROOT] [--per-category] [--num-gpus N] \\
        MODEL.WEIGHTS W [KEY VALUE ...]
    python tools/eval_net.py ...      # the same, from a source checkout

Results are printed and written to OUTPUT_DIR (``metrics.json``, ``coco_instances_results.json``).
"""
from __future__ import annotations

import argparse
import json

from instseg.utils.cli import add_dataset_argument

__all__ = ["get_parser", "run", "main"]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="", metavar="FILE")
    add_dataset_argument(p)
    p.add_argument("--per-category", action="store_true", help="also report AP per category")
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides (MODEL.WEIGHTS W ...)")
    return p


def run(argv=None):
    """Parse ``argv``, evaluate MODEL.WEIGHTS on DATASETS.TEST, print and return the results."""
    p = get_parser()
    args = p.parse_args(argv)
    from instseg.engine import default_setup, evaluate
    from instseg.engine.launch import setup_cfg_from_args

    cfg = setup_cfg_from_args(args)
    if not cfg.MODEL.WEIGHTS:
        p.error("MODEL.WEIGHTS is required (a checkpoint written by train_net.py or a converted official one)")
    default_setup(cfg, args)
    results = evaluate(cfg, num_gpus=args.num_gpus, per_category=args.per_category)
    print(json.dumps(results, indent=1))
    return results


def main(argv=None) -> int:
    """Console script ``instseg-eval``: :func:`run`, exit status 0."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
