#!/usr/bin/env python
"""COCO evaluation (segm and bbox AP, AP50/75/S/M/L) of a trained model.

    python tools/eval_net.py --config-file F MODEL.WEIGHTS W [--dataset NAME JSON ROOT] \
        [--per-category] [--num-gpus N] [KEY VALUE ...]

Results are printed and written to OUTPUT_DIR (``metrics.json``, ``coco_instances_results.json``).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from instseg.engine import default_setup, evaluate  # noqa: E402
from instseg.engine.launch import setup_cfg_from_args  # noqa: E402
from instseg.utils.cli import add_dataset_argument  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="", metavar="FILE")
    add_dataset_argument(p)
    p.add_argument("--per-category", action="store_true", help="also report AP per category")
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides (MODEL.WEIGHTS W ...)")
    args = p.parse_args(argv)
    cfg = setup_cfg_from_args(args)
    if not cfg.MODEL.WEIGHTS:
        p.error("MODEL.WEIGHTS is required (a checkpoint written by train_net.py or a converted official one)")
    default_setup(cfg, args)
    results = evaluate(cfg, num_gpus=args.num_gpus, per_category=args.per_category)
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
