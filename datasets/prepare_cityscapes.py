#!/usr/bin/env python
"""Check a Cityscapes folder and run cityscapesscripts' preparation on it, idempotently.

Usage::

    python datasets/prepare_cityscapes.py ROOT [--skip-panoptic] [--workers N]

``ROOT`` holds ``leftImg8bit/`` and ``gtFine/`` as unpacked from ``leftImg8bit_trainvaltest.zip``
and ``gtFine_trainvaltest.zip`` (e.g. ``$INSTSEG_DATASETS/cityscapes``). Steps:

1. **Layout check** of every split found under ``leftImg8bit/`` (``train``, ``val``, ``test``): city
   folders, and for every image its ``_gtFine_polygons.json`` and ``_gtFine_instanceIds.png``
   (the instance task needs nothing else). A wrong layout stops with the message that names the
   folder (:class:`instseg.data.cityscapes.CityscapesLayoutError`).
2. ``_gtFine_labelTrainIds.png`` next to every ``_gtFine_polygons.json`` (what cityscapesscripts'
   ``createTrainIdLabelImgs`` writes, with the same function ``json2labelImg(..., "trainIds")``),
   for the semantic task; files that exist already are kept.
3. ``gtFine/cityscapes_panoptic_<split>.json`` and ``gtFine/cityscapes_panoptic_<split>/`` with
   cityscapesscripts' ``createPanopticImgs.convert2panoptic`` (as
   ``createPanopticImgs --dataset-folder gtFine --output-folder gtFine``), for the panoptic task;
   a split whose json exists is skipped, and only the splits present are converted.

Running it again does only what is missing. Exit status 1 with the message on a bad layout.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # a checkout without install


def check_layout(root: str) -> List[str]:
    """Check ``root``'s layout (module docstring, step 1); return the splits found.

    Raises:
        CityscapesLayoutError: the message names the folder or file.
    """
    from instseg.data.cityscapes import CityscapesLayoutError, _list_files

    left, gt = os.path.join(root, "leftImg8bit"), os.path.join(root, "gtFine")
    for folder in (left, gt):
        if not os.path.isdir(folder):
            raise CityscapesLayoutError(f"{folder} not found: ROOT must hold leftImg8bit/ and gtFine/ "
                                        "(unpack leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into it)")
    splits = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(left, s))]
    if not splits:
        raise CityscapesLayoutError(f"{left}: no train/val/test split folders")
    for split in splits:
        for from_json in (True, False):  # both gtFine files of every image
            files = _list_files(os.path.join(left, split), os.path.join(gt, split), from_json)
        print(f"{split}: {len(files)} images in {len(os.listdir(os.path.join(left, split)))} cities: layout OK")
    return splits


def _train_id_image(json_file: str) -> str:
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    dst = json_file.replace("_polygons.json", "_labelTrainIds.png")
    json2labelImg(json_file, dst, "trainIds")
    return dst


def create_train_id_images(root: str, workers: int = 4) -> int:
    """Write the missing ``_gtFine_labelTrainIds.png`` (module docstring, step 2); returns how many."""
    files = sorted(glob.glob(os.path.join(root, "gtFine", "*", "*", "*_gt*_polygons.json")))
    todo = [f for f in files if not os.path.isfile(f.replace("_polygons.json", "_labelTrainIds.png"))]
    if todo:
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(_train_id_image, todo, chunksize=16))
    print(f"labelTrainIds: {len(todo)} written, {len(files) - len(todo)} already there")
    return len(todo)


def create_panoptic(root: str, splits: List[str]) -> List[str]:
    """Run ``convert2panoptic`` for the splits without ``cityscapes_panoptic_<split>.json``."""
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    gt = os.path.join(root, "gtFine")
    todo = [s for s in splits if not os.path.isfile(os.path.join(gt, f"cityscapes_panoptic_{s}.json"))]
    if todo:
        convert2panoptic(cityscapesPath=gt, outputFolder=gt, useTrainId=False, setNames=todo)
    print(f"panoptic: converted {todo or 'nothing'}; already there: {[s for s in splits if s not in todo] or 'none'}")
    return todo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", metavar="ROOT", help="folder with leftImg8bit/ and gtFine/")
    p.add_argument("--skip-panoptic", action="store_true", help="do not run createPanopticImgs")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes for the labelTrainIds images")
    args = p.parse_args(argv)
    from instseg.data.cityscapes import CityscapesLabelError, CityscapesLayoutError

    root = os.path.abspath(os.path.expanduser(args.root))
    try:
        splits = check_layout(root)
    except (CityscapesLayoutError, CityscapesLabelError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    create_train_id_images(root, args.workers)
    if not args.skip_panoptic:
        create_panoptic(root, splits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
