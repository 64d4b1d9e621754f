"""Measure a model's inference speed (FPS), parameters and FLOPs, as the papers report them.

Batch size 1, warm-up iterations, synchronized timing of the whole ``model([image])`` call:
pre-processing (normalize, pad), network and post-processing (mask upsampling to the original
size, thresholding). The timed inputs are what evaluation feeds the model: every image goes
through the test mapper (decode, antialiased resize to INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST)
before timing, so reading, decoding and resizing are excluded.

Examples::

    instseg-benchmark --config-file configs/sparseinst/R50_giam.yaml \\
        --images datasets/coco/val2017 --fp16 MODEL.WEIGHTS sparse_inst_r50_giam.pth
    instseg-benchmark --config-file configs/Base-SparseInst.yaml --input-size 640 640
    python tools/benchmark_fps.py ...     # the same, from a source checkout
    instseg-benchmark --backend onnxruntime --onnx model.onnx \\
        --config-file configs/sparseinst/R50_giam.yaml --images datasets/coco/val2017

``--backend onnxruntime --onnx FILE`` times an exported file (``instseg-export``) with the same
harness, inputs and statistics: per timed image, ``prepare_input`` to the ONNX input size, the ONNX
Runtime run (CPUExecutionProvider, ``torch.get_num_threads()`` intra-op threads) and the model's
post-processing (``finish_postprocess``; the PyTorch model of the config supplies that code only,
so empty MODEL.WEIGHTS is allowed). Needs ``pip install .[export]``; fp32 on the CPU only.

Images: ``--images DIR`` (the first --num-iter files by name), ``--test-set`` (the first
--num-iter images of DATASETS.TEST[0], e.g. one registered with --dataset), or by default
synthetic random images of --input-size (their original size; the test resize still applies).
Flags come before the KEY VALUE overrides (everything after the first KEY is an override).
Works with any registered ``MODEL.META_ARCHITECTURE`` that follows the data contract (docs/architecture.md).
Writes the report as JSON (default ``OUTPUT_DIR/benchmark.json``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Dict, Optional, Tuple

from instseg.utils.cli import add_dataset_argument

__all__ = ["get_parser", "setup_benchmark_cfg", "run", "main"]

logger = logging.getLogger("instseg.benchmark_fps")

COCO_NUM_CLASSES = 80


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to a config file")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--images", default="", metavar="DIR",
                     help="folder of images to time on (the first --num-iter files by name); "
                     "default: synthetic random images of --input-size")
    src.add_argument("--test-set", action="store_true",
                     help="time on the first --num-iter images of DATASETS.TEST[0]")
    parser.add_argument("--num-iter", type=int, default=100, help="timed iterations (default 100)")
    parser.add_argument("--num-warmup", type=int, default=10,
                        help="untimed warm-up iterations (default 10)")
    prec = parser.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="autocast to float16")
    prec.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--channels-last", action="store_true",
                        help="convert the model to channels_last memory format")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="original size of the synthetic images, before the test resize "
                        "(default: INPUT.MIN_SIZE_TEST square)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                        help="what runs the network: the PyTorch model (default) or --onnx in ONNX Runtime")
    parser.add_argument("--onnx", default="", metavar="FILE",
                        help="the exported file (instseg-export) for --backend onnxruntime")
    parser.add_argument("--output", default="", metavar="JSON",
                        help="where to write the report (default: OUTPUT_DIR/benchmark.json)")
    add_dataset_argument(parser)
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs")
    return parser


def setup_benchmark_cfg(args) -> Tuple[object, Optional[str]]:
    """The tools' config setup (:func:`instseg.engine.launch.setup_cfg_from_args`: model packages,
    ``--dataset``, config file, overrides, ``MODEL.NUM_CLASSES`` from DATASETS), unfrozen.

    Timing needs no dataset, so when ``MODEL.NUM_CLASSES`` is -1 and DATASETS.TRAIN/TEST are both
    empty it is taken from the first ``--dataset``'s categories, else COCO's 80. Returns
    ``(cfg, note)``; ``note`` says where that number came from (None when the config had it).
    """
    from instseg.engine.launch import setup_cfg_from_args

    try:
        return setup_cfg_from_args(args, freeze=False), None
    except ValueError:
        # The packages are imported and --dataset registered by now; re-read the config to see
        # whether the only problem is a class count that no dataset can give.
        from instseg.config import setup_cfg

        cfg = setup_cfg(args.config_file, args.opts or [], freeze=False)
        if cfg.MODEL.NUM_CLASSES > 0 or len(cfg.DATASETS.TRAIN) or len(cfg.DATASETS.TEST):
            raise
    if args.dataset:
        from instseg.data import MetadataCatalog

        name = args.dataset[0][0]
        cfg.MODEL.NUM_CLASSES = len(MetadataCatalog.get(name).thing_classes)
        return cfg, f"MODEL.NUM_CLASSES = {cfg.MODEL.NUM_CLASSES} (categories of --dataset {name})"
    cfg.MODEL.NUM_CLASSES = COCO_NUM_CLASSES
    return cfg, f"MODEL.NUM_CLASSES = {COCO_NUM_CLASSES} (COCO default: no dataset given)"


def run(argv=None) -> Dict:
    """Parse ``argv``, benchmark, print the report and write it as JSON; returns the report."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.images and args.input_size:
        parser.error("--input-size applies to synthetic images; real images are resized with "
                     "INPUT.MIN_SIZE_TEST / INPUT.MAX_SIZE_TEST")
    if args.test_set and args.input_size:
        parser.error("--input-size applies to synthetic images, not to --test-set")
    if args.num_iter < 1 or args.num_warmup < 0:
        parser.error("--num-iter must be >= 1 and --num-warmup >= 0")
    if args.backend == "onnxruntime":
        if not args.onnx:
            parser.error("--backend onnxruntime needs --onnx FILE (an exported model: instseg-export)")
        if not os.path.isfile(args.onnx):
            parser.error(f"--onnx: file not found: {args.onnx}")
        if args.fp16 or args.bf16 or args.channels_last:
            parser.error("--backend onnxruntime times fp32 on the CPU: no --fp16 / --bf16 / --channels-last")
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise ImportError("--backend onnxruntime: onnxruntime is not installed: pip install .[export] "
                              "(onnx, onnxruntime)") from e
    elif args.onnx:
        parser.error("--onnx is for --backend onnxruntime")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    from instseg.evaluation.timing import benchmark_from_config, format_benchmark_report

    cfg, note = setup_benchmark_cfg(args)
    if note:
        print(note)
    cfg.freeze()
    dataset = None
    if args.test_set:
        if not len(cfg.DATASETS.TEST):
            parser.error("--test-set: DATASETS.TEST is empty")
        dataset = cfg.DATASETS.TEST[0]

    result = benchmark_from_config(
        cfg, images=args.images or None, dataset=dataset, input_size=args.input_size,
        num_iter=args.num_iter, num_warmup=args.num_warmup,
        precision="fp16" if args.fp16 else "bf16" if args.bf16 else "fp32",
        channels_last=args.channels_last, flops=not args.no_flops,
        **({"onnx": args.onnx} if args.backend == "onnxruntime" else {}),
    )
    report = {"meta_architecture": result.pop("meta_architecture"), "config_file": args.config_file,
              **result}
    if args.no_flops:
        report["flops_error"] = "--no-flops"

    print(format_benchmark_report(report))
    out = args.output or os.path.join(cfg.OUTPUT_DIR, "benchmark.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"Report written to {out}")
    return report


def main(argv=None) -> int:
    """Console script ``instseg-benchmark``: :func:`run`, exit status 0."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
