"""Train any registered model (Detectron2-style flags).

    instseg-train --config-file configs/sparseinst/R50_giam.yaml \\
        [--dataset NAME JSON_FILE IMAGE_ROOT] [--num-gpus N] [--resume] [--eval-only] [KEY VALUE ...]
    python tools/train_net.py ...     # the same, from a source checkout

``--eval-only`` evaluates MODEL.WEIGHTS on DATASETS.TEST instead of training.
"""
from __future__ import annotations

import json

from instseg.utils.cli import default_argument_parser

__all__ = ["run", "main"]


def run(argv=None):
    """Parse ``argv``, train (or evaluate with ``--eval-only``), print and return the results."""
    args = default_argument_parser(__doc__).parse_args(argv)
    from instseg.engine import default_setup, evaluate, train
    from instseg.engine.launch import setup_cfg_from_args

    cfg = setup_cfg_from_args(args)
    default_setup(cfg, args)
    if args.eval_only:
        results = evaluate(cfg, num_gpus=args.num_gpus)
    else:
        results = train(
            cfg,
            resume=args.resume,
            num_gpus=args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
        )
    if results:
        print(json.dumps(results, indent=1))
    return results


def main(argv=None) -> int:
    """Console script ``instseg-train``: :func:`run`, exit status 0."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
