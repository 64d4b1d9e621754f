#!/usr/bin/env python
"""Measure a model's inference speed (FPS), parameters and FLOPs, as the papers report them.

Batch size 1, warm-up iterations, synchronized timing of the whole ``model([image])`` call:
pre-processing (normalize, pad), network and post-processing (mask upsampling to the original
size, thresholding). Image reading/decoding is excluded (images are decoded before timing).

Examples::

    python tools/benchmark_fps.py --config-file configs/sparseinst/R50_GIAM.yaml \\
        MODEL.WEIGHTS sparse_inst_r50_giam.pth --images datasets/coco/val2017 --fp16
    python tools/benchmark_fps.py --config-file configs/Base-SparseInst.yaml --input-size 640 640

Works with any registered ``MODEL.META_ARCHITECTURE`` that follows DESIGN.md's data contract.
Writes the report as JSON (default ``OUTPUT_DIR/benchmark.json``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

try:
    import instseg  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import instseg  # noqa: F401

import torch

from instseg.config import setup_cfg
from instseg.utils.cli import add_dataset_argument, register_cli_datasets

logger = logging.getLogger("instseg.benchmark_fps")

MODEL_PACKAGES = ("sparseinst", "fastinst", "fassst", "queryinst")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
COCO_NUM_CLASSES = 80


def import_model_packages(packages=MODEL_PACKAGES) -> List[str]:
    """Import each model package so that its meta-architecture and config keys are registered.

    A package that is not installed is skipped; one that exists but fails to import is reported
    (its error is not hidden). Returns the imported names.
    """
    imported = []
    for name in packages:
        try:
            importlib.import_module(name)
            imported.append(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                logger.warning("package '%s' failed to import: %s", name, e)
        except ImportError as e:
            logger.warning("package '%s' failed to import: %s", name, e)
    return imported


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to a config file")
    parser.add_argument("--images", default="", metavar="DIR",
                        help="folder of images to time on (the first --num-iter files by name); "
                        "default: synthetic random images of --input-size")
    parser.add_argument("--num-iter", type=int, default=100, help="timed iterations (default 100)")
    parser.add_argument("--num-warmup", type=int, default=10,
                        help="untimed warm-up iterations (default 10)")
    prec = parser.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="autocast to float16")
    prec.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--channels-last", action="store_true",
                        help="convert the model to channels_last memory format")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="size of the synthetic images (default: INPUT.MIN_SIZE_TEST square)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--output", default="", metavar="JSON",
                        help="where to write the report (default: OUTPUT_DIR/benchmark.json)")
    add_dataset_argument(parser)
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs")
    return parser


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> Tuple[int, int]:
    """Detectron2's ``ResizeShortestEdge`` test rule: scale the short side to ``short`` and cap
    the long side at ``max_size`` (``max_size <= 0``: no cap). Returns ``(new_h, new_w)``."""
    scale = short / min(h, w)
    if max_size > 0 and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def load_images(folder: str, num: int, short: int, max_size: int) -> List[Dict]:
    """Decode up to ``num`` images of ``folder`` (sorted by name) into input dicts.

    Returns ``[{"image": uint8 (3, H, W) RGB resized by the test rule, "height", "width" (original
    size), "image_id", "file_name"}]``.

    Raises:
        FileNotFoundError: the folder does not exist or holds no readable image.
    """
    import cv2

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images: not a folder: {folder}")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    inputs = []
    for i, name in enumerate(files):
        if len(inputs) >= num:
            break
        path = os.path.join(folder, name)
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            logger.warning("cannot read %s; skipped", path)
            continue
        h, w = bgr.shape[:2]
        nh, nw = shortest_edge_size(h, w, short, max_size)
        if (nh, nw) != (h, w):
            bgr = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_LINEAR)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        image = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
        inputs.append({"image": image, "height": h, "width": w, "image_id": i, "file_name": path})
    if not inputs:
        raise FileNotFoundError(f"--images: no readable image in {folder}")
    return inputs


def synthetic_images(num: int, height: int, width: int, seed: int = 0) -> List[Dict]:
    """``num`` random ``uint8 (3, height, width)`` images (original size = input size)."""
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g),
         "height": height, "width": width, "image_id": i, "file_name": f"synthetic_{i}"}
        for i in range(num)
    ]


def resolve_num_classes(cfg, args) -> Optional[str]:
    """Set ``MODEL.NUM_CLASSES`` when it is -1 (cfg must be unfrozen). Returns a note or None."""
    if cfg.MODEL.NUM_CLASSES > 0:
        return None
    if len(cfg.DATASETS.TEST) or len(cfg.DATASETS.TRAIN):
        from instseg.data import resolve_num_classes as _resolve

        ret = _resolve(cfg)
        if isinstance(ret, int) and cfg.MODEL.NUM_CLASSES <= 0:
            cfg.MODEL.NUM_CLASSES = ret
        return f"MODEL.NUM_CLASSES = {cfg.MODEL.NUM_CLASSES} (from DATASETS)"
    if args.dataset:
        name, json_file, _ = args.dataset[0]
        with open(json_file) as f:
            cfg.MODEL.NUM_CLASSES = len(json.load(f)["categories"])
        return f"MODEL.NUM_CLASSES = {cfg.MODEL.NUM_CLASSES} (categories of --dataset {name})"
    cfg.MODEL.NUM_CLASSES = COCO_NUM_CLASSES
    return f"MODEL.NUM_CLASSES = {COCO_NUM_CLASSES} (COCO default: no dataset given)"


def format_report(report: Dict) -> str:
    b = report
    h, w = b["input_size"]
    lines = [
        f"Benchmark of {b['meta_architecture']}" + (f" ({b['config_file']})" if b["config_file"] else ""),
        f"  weights:       {b['weights'] or '(random initialization)'}",
        f"  device:        {b['device']}",
        f"  precision:     {b['precision']}" + ("  (channels_last)" if b["channels_last"] else ""),
        f"  input size:    {h} x {w} (H x W, after resize; {b['images']})",
    ]
    if b.get("input_size_note"):
        lines.append(f"                 {b['input_size_note']}")
    lines += [
        f"  timed:         {b['timed']}",
        f"  warm-up:       {b['num_warmup']} iterations",
        f"  iterations:    {b['num_iter']} (batch size 1)",
        f"  FPS:           {b['fps']:.2f}",
        f"  ms/image:      {b['ms_per_image']:.2f} ± {b['ms_std']:.2f} (mean ± std; median "
        f"{b['ms_median']:.2f})",
        f"  parameters:    {b['params'] / 1e6:.2f} M ({b['params']:,})",
    ]
    if b.get("gflops") is not None:
        fh, fw = b["flops_input_size"]
        lines.append(f"  GFLOPs:        {b['gflops']:.2f} (fvcore, 1 multiply-add = 1 FLOP; "
                     f"{b['flops_counted']} on a {fh} x {fw} input)")
    else:
        lines.append(f"  GFLOPs:        n/a ({b.get('flops_error', 'skipped')})")
    if b.get("max_memory_mb") is not None:
        lines.append(f"  max GPU memory: {b['max_memory_mb']:.0f} MiB")
    return "\n".join(lines)


def main(argv=None) -> Dict:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    from instseg.evaluation.timing import benchmark_model, count_flops, count_parameters
    from instseg.modeling import build_model

    import_model_packages()
    register_cli_datasets(args)
    cfg = setup_cfg(args.config_file, args.opts or [], freeze=False)
    note = resolve_num_classes(cfg, args)
    if note:
        print(note)
    cfg.freeze()

    if args.images and args.input_size:
        raise SystemExit("--input-size applies to synthetic images; real images are resized with "
                         "INPUT.MIN_SIZE_TEST / INPUT.MAX_SIZE_TEST")
    if args.num_iter < 1 or args.num_warmup < 0:
        raise SystemExit("--num-iter must be >= 1 and --num-warmup >= 0")
    torch.backends.cudnn.benchmark = bool(cfg.CUDNN_BENCHMARK)

    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        from instseg.checkpoint import load_checkpoint

        load_checkpoint(model, cfg.MODEL.WEIGHTS)
    model.eval()

    if args.images:
        inputs = load_images(args.images, args.num_iter, cfg.INPUT.MIN_SIZE_TEST,
                             cfg.INPUT.MAX_SIZE_TEST)
        images_desc = f"{len(inputs)} images from {args.images}"
    else:
        h, w = args.input_size or (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)
        inputs = synthetic_images(min(args.num_iter, 10), h, w)
        images_desc = "synthetic random images"

    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    device = cfg.MODEL.DEVICE
    result = benchmark_model(model, inputs, num_warmup=args.num_warmup, num_iter=args.num_iter,
                             precision=precision, channels_last=args.channels_last, device=device)

    report = {
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "config_file": args.config_file,
        "weights": cfg.MODEL.WEIGHTS,
        "num_classes": cfg.MODEL.NUM_CLASSES,
        "images": images_desc,
        **result,
        "params": count_parameters(model),
    }
    report["params_m"] = report["params"] / 1e6
    if not args.no_flops:
        try:
            report["gflops"] = count_flops(model, inputs[:1])
            report["flops_input_size"] = list(inputs[0]["image"].shape[-2:])
            report["flops_counted"] = (
                "network (flops_forward)" if hasattr(model, "flops_forward")
                else "full model() call")
        except Exception as e:  # tracing can fail on exotic ops; timing is still valid
            logger.warning("FLOP count failed: %s", e)
            report["gflops"] = None
            report["flops_error"] = f"{type(e).__name__}: {e}"
    else:
        report["gflops"] = None
        report["flops_error"] = "--no-flops"

    print(format_report(report))
    out = args.output or os.path.join(cfg.OUTPUT_DIR, "benchmark.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"Report written to {out}")
    return report


if __name__ == "__main__":
    main()
