"""``tools/benchmark_coco_eval.py``: COCO evaluation backends timed on one synthetic result set.

Generates a seeded COCO dataset and result set (``--num-images`` images of ``--height`` x
``--width`` pixels, ``--dets-per-image`` detections each, polygon ground truth with some crowd
RLE regions and some empty images, RLE detections with scores rounded to 2 decimals so that
many tie), then times each backend in turn, interleaved over ``--rounds`` rounds:
``loadRes`` + ``evaluate`` + ``accumulate`` + ``summarize`` (the part of
:class:`instseg.evaluation.COCOEvaluator` that depends on the backend; the ground truth is loaded
from the same json file beforehand, outside the timer). Prints the 12 summary numbers of each
backend, whether they are identical to pycocotools' (exact float equality), the largest
difference of ``eval["precision"]`` (what per-category AP is read from) and the time ratio.
Exit status 1 when a backend's 12 numbers differ from pycocotools'.

    python tools/benchmark_coco_eval.py [--num-images 5000] [--dets-per-image 100] \\
        [--iou-type segm bbox] [--backends pycocotools hotcoco [faster_coco_eval]] [--rounds 2]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np

# The 12 numbers of COCOeval.summarize() (pycocotools' order).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _polygon(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float, n: int = 12) -> List[float]:
    """A star-shaped polygon (``n`` vertices, radii jittered by +-25 %) as COCO's flat [x0, y0, ...]."""
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(0.75, 1.25, n)
    xy = np.stack([cx + rx * rad * np.cos(ang), cy + ry * rad * np.sin(ang)], 1)
    return [float(v) for v in np.round(xy, 2).reshape(-1)]


def make_synthetic(
    num_images: int = 5000,
    dets_per_image: int = 100,
    height: int = 200,
    width: int = 300,
    num_categories: int = 10,
    seed: int = 0,
) -> Tuple[Dict, List[Dict]]:
    """A seeded COCO ground-truth dict and a result list that exercises COCOeval's corner cases.

    Ground truth: 0-12 objects per image (about 5 % of the images have none), star-shaped
    polygons of areas from ~20 to ~20,000 pixels (small, medium and large), about 4 % crowd
    regions stored as compressed RLE; category ids 1, 3, 5, ... (not contiguous).
    Results: exactly ``dets_per_image`` per image (each with an RLE ``"segmentation"`` with str
    counts and its ``"bbox"`` [x, y, w, h]): one to three perturbed copies of each object (its
    category 90 % of the time, scores in [0.2, 1]), the rest random false positives (scores in
    [0.01, 0.6]); scores rounded to 2 decimals, so that many tie.

    Returns:
        ``(gt, results)``: ``gt`` has ``images``, ``annotations`` (with ``area``, ``bbox``,
        ``iscrowd``) and ``categories``; ``results`` is a list of COCO result dicts.
    """
    import pycocotools.mask as mask_util

    rng = np.random.default_rng(seed)
    cat_ids = [2 * i + 1 for i in range(num_categories)]
    images, anns, results = [], [], []
    ann_id = 1
    for img_id in range(1, num_images + 1):
        images.append({"id": img_id, "file_name": f"{img_id:06d}.jpg", "height": height, "width": width})
        n_gt = 0 if rng.random() < 0.05 else int(rng.integers(1, 13))
        gt_objs = []
        for _ in range(n_gt):
            r = float(np.exp(rng.uniform(np.log(3), np.log(80))))
            rx, ry = r * rng.uniform(0.6, 1.4), r * rng.uniform(0.6, 1.4)
            poly = _polygon(rng, rng.uniform(0, width), rng.uniform(0, height), rx, ry)
            cat = int(rng.choice(cat_ids))
            crowd = rng.random() < 0.04
            rle = mask_util.merge(mask_util.frPyObjects([poly], height, width))
            area = float(mask_util.area(rle))
            if area < 1:
                continue
            gt_objs.append((np.asarray(poly).reshape(-1, 2), (rx + ry) / 2, cat))
            if crowd:
                seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            else:
                seg = [poly]
            anns.append({"id": ann_id, "image_id": img_id, "category_id": cat, "iscrowd": int(crowd),
                         "area": area, "bbox": [float(v) for v in mask_util.toBbox(rle)], "segmentation": seg})
            ann_id += 1
        polys, cats, scores = [], [], []
        for xy, r, cat in gt_objs:  # perturbed copies: IoUs from ~0.3 to ~0.95
            for _ in range(int(rng.integers(1, 4))):
                if len(polys) >= dets_per_image:
                    break
                c = xy.mean(0) + rng.normal(0, 0.08 * r, 2)
                d = (xy - xy.mean(0)) * rng.uniform(0.85, 1.15) + c + rng.normal(0, rng.uniform(0.01, 0.15) * r, xy.shape)
                polys.append([float(v) for v in np.round(d, 2).reshape(-1)])
                cats.append(cat if rng.random() < 0.9 else int(rng.choice(cat_ids)))
                scores.append(rng.uniform(0.2, 1.0))
        while len(polys) < dets_per_image:  # false positives, mostly low scores
            r = float(np.exp(rng.uniform(np.log(3), np.log(60))))
            polys.append(_polygon(rng, rng.uniform(0, width), rng.uniform(0, height), r, r * rng.uniform(0.6, 1.4)))
            cats.append(int(rng.choice(cat_ids)))
            scores.append(rng.uniform(0.01, 0.6))
        rles = mask_util.frPyObjects(polys, height, width)
        boxes = mask_util.toBbox(rles)
        scores = np.round(scores, 2)
        for rle, box, cat, score in zip(rles, boxes, cats, scores):
            results.append({"image_id": img_id, "category_id": cat, "score": float(score),
                            "bbox": [float(v) for v in box],
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": f"class_{c}", "supercategory": "thing"} for c in cat_ids]}
    return gt, results


def _backend_api(name: str):
    """``(COCO, COCOeval factory)`` of a backend."""
    if name == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, lambda gt, dt, t: COCOeval(gt, dt, t)
    if name == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, lambda gt, dt, t: COCOeval_faster(gt, dt, t, print_function=lambda *a, **k: None)
    if name == "hotcoco":
        from hotcoco import COCO, COCOeval

        return COCO, lambda gt, dt, t: COCOeval(gt, dt, t)
    raise ValueError(f"unknown backend {name!r} (pycocotools, faster_coco_eval, hotcoco)")


def run_backend(name: str, gt_file: str, results: List[Dict], iou_type: str) -> Tuple[float, np.ndarray, np.ndarray]:
    """One timed evaluation.

    Args:
        name: ``"pycocotools"``, ``"faster_coco_eval"`` or ``"hotcoco"``.
        gt_file: COCO ground-truth json (loaded before the timer starts).
        results: COCO result dicts (shallow-copied here, since ``loadRes`` adds keys).
        iou_type: ``"segm"`` or ``"bbox"``.

    Returns:
        ``(seconds, stats, precision)``: wall time of loadRes + evaluate + accumulate + summarize,
        the 12 summary numbers (float64, fractions; -1 where undefined) and
        ``eval["precision"]`` (T, R, K, A, M).
    """
    coco_cls, make_eval = _backend_api(name)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls(gt_file)
    drop = "bbox" if iou_type == "segm" else "segmentation"  # as COCOEvaluator does
    res = [{k: v for k, v in r.items() if k != drop} for r in results]
    gc.collect()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(res)
        ev = make_eval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    seconds = time.perf_counter() - t0
    stats = np.asarray(ev.stats, dtype=np.float64)[: len(STAT_NAMES)]
    precision = np.asarray(ev.eval["precision"], dtype=np.float64)
    del ev, coco_dt, coco_gt, res
    gc.collect()
    return seconds, stats, precision


def _versions(backends: Sequence[str]) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"pycocotools": "pycocotools", "faster_coco_eval": "faster-coco-eval", "hotcoco": "hotcoco"}
    out = []
    for b in ["numpy", *backends]:
        try:
            out.append(f"{b} {version(dist.get(b, b))}")
        except PackageNotFoundError:
            out.append(f"{b} (not installed)")
    return ", ".join(out)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=5000)
    p.add_argument("--dets-per-image", type=int, default=100)
    p.add_argument("--height", type=int, default=200)
    p.add_argument("--width", type=int, default=300)
    p.add_argument("--iou-type", nargs="+", choices=("segm", "bbox"), default=["segm", "bbox"])
    p.add_argument("--backends", nargs="+", choices=("pycocotools", "faster_coco_eval", "hotcoco"),
                   default=["pycocotools", "hotcoco"],
                   help="pycocotools is always run (the reference) and goes first")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per backend (the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the timings and summaries to this file")
    return p


def main(argv=None) -> int:
    """Run the benchmark (see the module docstring); returns the exit status (1: numbers differ)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.dets_per_image < 1 or args.rounds < 1:
        parser.error("--num-images, --dets-per-image and --rounds must be >= 1")
    if args.height < 16 or args.width < 16:
        parser.error("--height and --width must be >= 16 pixels")
    backends = ["pycocotools"] + [b for b in args.backends if b != "pycocotools"]
    for b in backends:
        _backend_api(b)  # an ImportError names the missing package before the slow part
    print(f"machine: {_cpu_name()}, {os.cpu_count()} logical cores; {_versions(backends)}")
    t0 = time.perf_counter()
    gt, results = make_synthetic(args.num_images, args.dets_per_image, args.height, args.width, seed=args.seed)
    n_crowd = sum(a["iscrowd"] for a in gt["annotations"])
    print(f"synthetic set (seed {args.seed}): {len(gt['images'])} images of {args.height}x{args.width}, "
          f"{len(gt['annotations'])} ground-truth objects ({n_crowd} crowd), {len(results)} detections; "
          f"generated in {time.perf_counter() - t0:.1f} s")
    report = {"num_images": args.num_images, "dets_per_image": args.dets_per_image, "tasks": {}}
    all_identical = True
    with tempfile.TemporaryDirectory() as tmp:
        gt_file = os.path.join(tmp, "gt.json")
        with open(gt_file, "w") as f:
            json.dump(gt, f)
        del gt
        for iou_type in args.iou_type:
            times = {b: [] for b in backends}
            out = {}
            for _ in range(args.rounds):
                for b in backends:
                    sec, stats, prec = run_backend(b, gt_file, results, iou_type)
                    times[b].append(sec)
                    out[b] = (stats, prec)
            ref_stats, ref_prec = out["pycocotools"]
            print(f"\n== {iou_type}: loadRes + evaluate + accumulate + summarize, {args.rounds} interleaved rounds ==")
            print("| backend | " + " | ".join(STAT_NAMES)
                  + " | 12 numbers identical | precision max abs diff | seconds (median) | time / pycocotools |")
            print("|---" * (len(STAT_NAMES) + 5) + "|")
            task_report = {}
            for b in backends:
                stats, prec = out[b]
                same = bool(np.array_equal(stats, ref_stats))
                prec_diff = float(np.abs(prec - ref_prec).max()) if prec.shape == ref_prec.shape else float("inf")
                all_identical &= same
                med = float(np.median(times[b]))
                ratio = med / float(np.median(times["pycocotools"]))
                print(f"| {b} | " + " | ".join(f"{100 * v:.3f}" for v in stats)
                      + f" | {'yes' if same else 'NO'} | {prec_diff:.3g} | {med:.2f} | {ratio:.3f} |")
                if not same:
                    diff = np.abs(stats - ref_stats)
                    print(f"  {b}: largest summary difference {diff.max():.3g} at {STAT_NAMES[int(diff.argmax())]}")
                task_report[b] = {"stats": stats.tolist(), "seconds": times[b], "identical": same,
                                  "precision_max_abs_diff": prec_diff, "ratio": ratio}
            report["tasks"][iou_type] = task_report
    print("\n12 summary numbers identical to pycocotools for every backend and IoU type:",
          "yes" if all_identical else "NO")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if all_identical else 1


if __name__ == "__main__":
    sys.exit(main())
