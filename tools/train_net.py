#!/usr/bin/env python
"""Train any registered model (Detectron2-style flags).

    python tools/train_net.py --config-file configs/sparseinst/R50_giam.yaml \
        [--dataset NAME JSON_FILE IMAGE_ROOT] [--num-gpus N] [--resume] [--eval-only] [KEY VALUE ...]

``--eval-only`` evaluates MODEL.WEIGHTS on DATASETS.TEST instead of training.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from instseg.engine import default_setup, evaluate, train  # noqa: E402
from instseg.engine.launch import setup_cfg_from_args  # noqa: E402
from instseg.utils.cli import default_argument_parser  # noqa: E402


def main(argv=None):
    args = default_argument_parser(__doc__).parse_args(argv)
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


if __name__ == "__main__":
    main()
