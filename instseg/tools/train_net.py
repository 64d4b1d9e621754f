"""Train any registered model (Detectron2-style flags).

    instseg-train --config-file configs/sparseinst/R50_giam.yaml \\
        [--dataset NAME JSON_FILE IMAGE_ROOT] [--num-gpus N] [--resume | --overwrite] \\
        [--eval-only [--allow-partial-weights]] [KEY VALUE ...]
    instseg-train --config-file F --profile 10 [--profile-warmup 2] [KEY VALUE ...]
    python tools/train_net.py ...     # the same, from a source checkout

``--config-file`` is required. ``--eval-only`` evaluates MODEL.WEIGHTS on DATASETS.TEST instead
of training; weights that do not fill the model are an error unless ``--allow-partial-weights``.
A new run into an OUTPUT_DIR holding another run's checkpoints stops unless ``--resume``
(continue it) or ``--overwrite`` (delete them). Fatal errors are also written, with their
traceback, to OUTPUT_DIR/log.txt. ``--profile N`` trains nothing to keep: it times N training
iterations (after ``--profile-warmup`` untimed ones) stage by stage (data loading, forward + loss,
matching, backward, optimizer; :func:`instseg.engine.profile.profile_training`), prints the table
and the JSON report, and writes nothing to OUTPUT_DIR.
"""
from __future__ import annotations

import json

from instseg.utils.cli import CONFIG_FILE_REQUIRED, default_argument_parser

__all__ = ["run", "main"]


def run(argv=None):
    """Parse ``argv``, train (or evaluate with ``--eval-only``), print and return the results.

    Raises:
        SystemExit: (status 2, argparse) no ``--config-file``; ``--resume`` with ``--overwrite``;
            ``--eval-only`` without MODEL.WEIGHTS.
        instseg.engine.launch.OutputDirInUseError: a new run into another run's OUTPUT_DIR.
        instseg.checkpoint.IncompleteWeightsError: ``--eval-only`` with weights that do not fill the model.
    """
    parser = default_argument_parser(__doc__)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="time N training iterations stage by stage and print the table (nothing is trained or written)")
    parser.add_argument("--profile-warmup", type=int, default=2, metavar="W",
                        help="untimed iterations before the --profile ones (default 2)")
    args = parser.parse_args(argv)
    if not args.config_file:
        parser.error(CONFIG_FILE_REQUIRED)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other (continue the run in OUTPUT_DIR, or delete it)")
    from instseg.engine import default_setup, evaluate, train
    from instseg.engine.launch import fatal_errors_logged, setup_cfg_from_args

    if args.profile < 0 or args.profile_warmup < 0:
        parser.error("--profile and --profile-warmup must be >= 0")
    if args.profile and (args.eval_only or args.resume):
        parser.error("--profile runs fresh training iterations: not with --eval-only or --resume")
    cfg = setup_cfg_from_args(args)
    if args.profile:
        return _profile(cfg, args.profile, args.profile_warmup)
    if args.eval_only and not cfg.MODEL.WEIGHTS:
        parser.error("--eval-only needs MODEL.WEIGHTS (a checkpoint written by train_net.py or a converted official one)")
    with fatal_errors_logged(cfg.OUTPUT_DIR):
        default_setup(cfg, args)
        if args.eval_only:
            results = evaluate(cfg, num_gpus=args.num_gpus, allow_partial_weights=args.allow_partial_weights)
        else:
            results = train(
                cfg,
                resume=args.resume,
                num_gpus=args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                overwrite=args.overwrite,
            )
    if results:
        print(json.dumps(results, indent=1))
    return results


def _profile(cfg, num_iter: int, num_warmup: int):
    from instseg.engine.launch import seed_from_cfg, setup_logging
    from instseg.engine.profile import format_profile, profile_training

    setup_logging()
    seed_from_cfg(cfg)
    report = profile_training(cfg, num_iter=num_iter, num_warmup=num_warmup)
    print(format_profile(report))
    print(json.dumps({k: v for k, v in report.items() if k != "per_iter_ms"}, indent=1))
    return report


def main(argv=None) -> int:
    """Console script ``instseg-train``: :func:`run`, exit status 0 (an error raises: status 1,
    or 2 for a command-line error)."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
