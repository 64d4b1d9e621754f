"""Export a model to ONNX and check it against PyTorch with ONNX Runtime.

    instseg-export --format onnx --config-file F --output model.onnx [--input-size H W | --dynamic]
                   [--simplify] MODEL.WEIGHTS W
    python tools/export_model.py ...      # the same, from a source checkout

The graph holds the pixel normalization, the network and the post-processing ONNX expresses
(the model's ``export_forward``: SparseInst / FastInst the network's query logits and mask
logits, FASSST per-slot scores / labels / clipped boxes and the mask tail on all slots, QueryInst
the top-k (query, class) pairs with their boxes and mask logits). Its inputs are ``image``:
float32 ``(1, 3, H, W)``, RGB 0-255, resized by the test transform and padded at the bottom /
right with the pixel mean (:func:`instseg.export.prepare_input`), and, where the model uses it,
``image_size``: int64 ``(1, 2)``, the ``(h, w)`` of the image inside the padding. What stays in
Python (selection with a data-dependent count, mask pasting / upsampling at the output size) is
:func:`instseg.export.finish_postprocess` (the model's ``export_postprocess``; docs/deploy.md
"Export (ONNX)"). Without ``--input-size`` the size is ``INPUT.MAX_SIZE_TEST`` rounded up to
``MODEL.SIZE_DIVISIBILITY``, square; ``--dynamic`` makes height and width dynamic (traced at
that size). ``--simplify`` rewrites the file with onnxslim (skipped, with a message, when it is
not installed); the verification runs on the file as written.

After writing, the file is run with ONNX Runtime (CPUExecutionProvider) and the PyTorch model
on ``--images`` (default: 3 images of ../shared/data/coco128-seg/images when present), each
resized as the Predictor resizes it (the test mapper), scaled down to fit a fixed input size if
needed (keeping its aspect ratio) and padded (a dynamic graph: padded to
``MODEL.SIZE_DIVISIBILITY`` only). Printed: the largest absolute / relative difference per
output, the mask IoU (masks binarized at the model's threshold at the network's resolution),
and the final results (both sets of outputs finished by ``finish_postprocess``): instance
counts, labels, score / box differences and the final-mask IoU per image (intersection and union
summed over its instances; the smallest per-instance IoU is printed too). Exit status 1 when an
output differs by more than ``atol + rtol * max|PyTorch output|``, a mask IoU (low resolution or
final, per image) is below 0.99, or more than 1 % of the final instances have no partner of their label and score (within atol +
rtol) on the other side (near-equal scores that the top-k / threshold cut separates are counted as
ties, not failures).

Needs the ``export`` extra (``pip install .[export]``: onnx, onnxruntime, onnxslim). Flags come
before the KEY VALUE overrides.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import sys
from typing import List, Optional

from instseg.utils.cli import (CONFIG_FILE_REQUIRED, add_allow_partial_weights_argument, add_dataset_argument,
                               split_trailing_opts)

__all__ = ["get_parser", "run", "main", "default_images", "MIN_MASK_IOU"]

logger = logging.getLogger("instseg.export")

#: The smallest mask IoU (ONNX vs PyTorch, low resolution) that passes.
MIN_MASK_IOU = 0.99
#: Largest fraction of final instances without a partner on the other side (near-ties at a selection cut).
MAX_UNMATCHED = 0.01
_SHARED_IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              os.pardir, "shared", "data", "coco128-seg", "images")


def default_images(n: int = 3) -> List[str]:
    """The first ``n`` images (by name) of ../shared/data/coco128-seg/images, or ``[]``."""
    root = os.path.normpath(_SHARED_IMAGES)
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, f) for f in sorted(os.listdir(root))
            if f.lower().endswith((".jpg", ".jpeg", ".png"))][:n]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=("onnx",), default="onnx", help="export format (onnx)")
    p.add_argument("--config-file", default="", metavar="FILE", help="path to a config file")
    p.add_argument("--output", default="model.onnx", metavar="FILE", help="the file to write (default model.onnx)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), default=None,
                      help="fixed input size, multiples of MODEL.SIZE_DIVISIBILITY (default: INPUT.MAX_SIZE_TEST "
                      "rounded up, square)")
    size.add_argument("--dynamic", action="store_true",
                      help="dynamic height and width (traced at INPUT.MAX_SIZE_TEST rounded up, square; verified at "
                      "each image's own padded size)")
    p.add_argument("--simplify", action="store_true",
                   help="simplify the graph with onnxslim (skipped with a message when onnxslim is not installed)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--random-weights", action="store_true",
                   help="export a randomly initialized model instead of MODEL.WEIGHTS (for tests)")
    p.add_argument("--images", nargs="+", default=None, metavar="IMG",
                   help="images to verify on (default: 3 of ../shared/data/coco128-seg/images if present)")
    p.add_argument("--atol", type=float, default=1e-3,
                   help="tolerance: an output fails when its max abs difference exceeds atol + rtol * max|PyTorch "
                   "output| (default atol 1e-3)")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative part of the tolerance (default 1e-3)")
    add_allow_partial_weights_argument(p)
    add_dataset_argument(p)
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                   help="config overrides as KEY VALUE pairs (MODEL.WEIGHTS W ...)")
    return p


def run(argv=None) -> int:
    """Parse ``argv``, export, verify and print the table; returns the exit status (0 pass, 1 fail).

    Raises:
        SystemExit: (status 2) no ``--config-file``; no weights and no ``--random-weights``; onnx
            or onnxruntime missing.
        FileNotFoundError: an image or the weights file (named).
    """
    p = get_parser()
    args = p.parse_args(argv)
    split_trailing_opts(args, "images")
    if not args.config_file:
        p.error(CONFIG_FILE_REQUIRED)
    try:
        import onnx
        import onnxruntime  # noqa: F401
    except ImportError as e:
        p.error(f"{e.name} is not installed: pip install .[export] (onnx, onnxruntime)")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    from instseg.engine.launch import setup_cfg_from_args
    from instseg.engine.predictor import Predictor
    from instseg.export import export_onnx, prepare_input, verify_onnx

    cfg = setup_cfg_from_args(args, freeze=False)
    cfg.MODEL.DEVICE = "cpu"  # a portable graph, verified on the CPU
    cfg.freeze()
    if not cfg.MODEL.WEIGHTS and not args.random_weights:
        p.error("MODEL.WEIGHTS is required (a checkpoint written by train_net.py or a converted official "
                "one), or --random-weights for a randomly initialized model")
    predictor = Predictor(cfg, weights="" if args.random_weights else None, allow_random=args.random_weights,
                          allow_partial_weights=args.allow_partial_weights)
    model = predictor.model
    d = max(int(cfg.MODEL.SIZE_DIVISIBILITY), 1)
    if args.input_size:
        size: Optional[tuple] = tuple(args.input_size)
    else:
        side = math.ceil(int(cfg.INPUT.MAX_SIZE_TEST) / d) * d
        size = (side, side)
    simplify = args.simplify
    if simplify and importlib.util.find_spec("onnxslim") is None:
        print("--simplify skipped: onnxslim is not installed (pip install .[export] or pip install onnxslim)")
        simplify = False
    names = export_onnx(model, args.output, input_size=size, dynamic=args.dynamic, opset=args.opset,
                        simplify=simplify)
    inputs_declared = [i.name for i in onnx.load(args.output, load_external_data=False).graph.input]
    print(f"wrote {args.output}{' (simplified with onnxslim)' if simplify else ''} (outputs: {', '.join(names)}; "
          f"input 'image' float32 (1, 3, {'H, W dynamic' if args.dynamic else f'{size[0]}, {size[1]}'}) RGB 0-255"
          f"{', image_size int64 (1, 2)' if 'image_size' in inputs_declared else ''})")
    files = args.images if args.images else default_images()
    if not files:
        print("no --images and no ../shared/data/coco128-seg/images: the export was not verified")
        return 0
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"--images: file not found: {f}")
    prepared = [prepare_input(predictor.preprocess(f)["image"], None if args.dynamic else size,
                              cfg.MODEL.PIXEL_MEAN, d) for f in files]
    result = verify_onnx(args.output, model, [a for a, _ in prepared], image_sizes=[hw for _, hw in prepared],
                         score_tol=args.atol + args.rtol)
    ok = True
    print(f"ONNX Runtime (CPU) vs PyTorch on {len(files)} images; tolerance atol {args.atol:g} + rtol {args.rtol:g} "
          f"x max|output|, mask IoU >= {MIN_MASK_IOU}")
    print(f"{'output':<16}{'max abs diff':>14}{'max rel diff':>14}  status")
    for name in names:
        r = result[name]
        bound = args.atol + args.rtol * r["max_ref"]
        passed = r["max_abs"] <= bound
        ok &= passed
        print(f"{name:<16}{r['max_abs']:>14.3e}{r['max_rel']:>14.3e}  {'ok' if passed else 'FAIL'}")
    if "mask_iou" in result:
        iou = result["mask_iou"]
        passed = iou["min"] >= MIN_MASK_IOU
        ok &= passed
        print(f"{'mask IoU':<16}{'min ' + format(iou['min'], '.5f'):>14}{'mean ' + format(iou['mean'], '.5f'):>14}"
              f"  {'ok' if passed else 'FAIL'}")
    fin = result["final"]
    passed = fin["unmatched"] <= MAX_UNMATCHED * max(fin["instances"], 1) and fin["mask_iou_min"] >= MIN_MASK_IOU
    ok &= passed
    print(f"final results (finish_postprocess on both): {fin['instances']} instances, {fin['unmatched']} unmatched, "
          f"{fin['tied_at_cut']} tied at the top-k / threshold cut, {fin['count_mismatch']} images with other counts; "
          f"paired: max score diff {fin['max_score_diff']:.3e}, max box diff "
          f"{fin['max_box_diff']:.3e} px")
    print(f"{'final mask IoU':<16}{'min ' + format(fin['mask_iou_min'], '.5f'):>14}"
          f"{'mean ' + format(fin['mask_iou_mean'], '.5f'):>14}  {'ok' if passed else 'FAIL'}  (per image; smallest "
          f"per-instance IoU {fin['instance_mask_iou_min']:.5f})")
    print("PASS" if ok else "FAIL: the ONNX outputs differ from PyTorch beyond the tolerance")
    return 0 if ok else 1


def main(argv=None) -> int:
    """Console script ``instseg-export``: :func:`run`'s exit status."""
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
