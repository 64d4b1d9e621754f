"""Evaluation of a trained model on every dataset of DATASETS.TEST, with the evaluators its
dataset type and the model's outputs select: COCO AP (segm and bbox AP, AP50/75/S/M/L),
Cityscapes AP (cityscapesscripts), PQ/SQ/RQ for panoptic datasets and mIoU for semantic ones
(docs/panoptic_semantic.md).

    instseg-eval --config-file F [--dataset NAME JSON ROOT] [--per-category] [--num-gpus N] \\
        [--channels-last] [--bf16] MODEL.WEIGHTS W [KEY VALUE ...]
    python tools/eval_net.py ...      # the same, from a source checkout

Results are printed and written to OUTPUT_DIR (``metrics.json``; per dataset under
``inference/<name>/``: ``coco_instances_results.json``, ``panoptic_metrics.json``,
``sem_seg_metrics.json``).
``--config-file`` and MODEL.WEIGHTS are required; weights that do not fill the model (missing,
unexpected or shape-mismatched tensors: another model family or class count, an ImageNet backbone
file) are an error listing them, unless ``--allow-partial-weights``. Evaluating into a training
folder is fine (no checkpoint is written; a differing config goes to ``config.<time>.yaml``).
``--channels-last`` runs the model in ``torch.channels_last`` memory format (the same numbers up
to float summation order; 1.16x / 1.21x faster for SparseInst R-50 / FastInst-D3 on a 2-core CPU,
docs/benchmarks.md); ``--bf16`` evaluates under bfloat16 autocast (Lightning ``bf16-mixed``;
``SOLVER.AMP.ENABLED True SOLVER.AMP.PRECISION bf16``), which changes the numbers: compare its AP.
"""
from __future__ import annotations

import argparse
import json

from instseg.utils.cli import CONFIG_FILE_REQUIRED, add_allow_partial_weights_argument, add_dataset_argument

__all__ = ["get_parser", "run", "main"]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="", metavar="FILE")
    add_dataset_argument(p)
    p.add_argument("--per-category", action="store_true", help="also report AP per category")
    add_allow_partial_weights_argument(p)
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("--channels-last", action="store_true",
                   help="run the model in torch.channels_last memory format (faster convolutions on CPUs)")
    p.add_argument("--bf16", action="store_true", help="evaluate under bfloat16 autocast (changes the numbers)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides (MODEL.WEIGHTS W ...)")
    return p


def run(argv=None):
    """Parse ``argv``, evaluate MODEL.WEIGHTS on DATASETS.TEST, print and return the results.

    Raises:
        SystemExit: (status 2, argparse) no ``--config-file`` or no MODEL.WEIGHTS.
        instseg.checkpoint.IncompleteWeightsError: the weights do not fill the model and
            ``--allow-partial-weights`` was not given.
    """
    p = get_parser()
    args = p.parse_args(argv)
    if not args.config_file:
        p.error(CONFIG_FILE_REQUIRED)
    from instseg.engine import default_setup, evaluate
    from instseg.engine.launch import fatal_errors_logged, setup_cfg_from_args

    if args.bf16:
        args.opts = list(args.opts or []) + ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bf16"]
    cfg = setup_cfg_from_args(args)
    if not cfg.MODEL.WEIGHTS:
        p.error("MODEL.WEIGHTS is required (a checkpoint written by train_net.py or a converted official one)")
    with fatal_errors_logged(cfg.OUTPUT_DIR):
        default_setup(cfg, args)
        results = evaluate(cfg, num_gpus=args.num_gpus, per_category=args.per_category,
                           allow_partial_weights=args.allow_partial_weights, channels_last=args.channels_last)
    print(json.dumps(results, indent=1))
    return results


def main(argv=None) -> int:
    """Console script ``instseg-eval``: :func:`run`, exit status 0 (an error raises: status 1,
    or 2 for a command-line error)."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
