"""Command-line helpers shared by the tools (Detectron2-style flags, docs/architecture.md "Tools").

``default_argument_parser`` is ``tools/train_net.py``'s full set of flags; other tools may build
their own parser and call :func:`add_dataset_argument` and :func:`register_cli_datasets` so that
every tool understands ``--dataset NAME JSON_FILE IMAGE_ROOT``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional

__all__ = ["default_argument_parser", "add_dataset_argument", "add_allow_partial_weights_argument",
           "register_cli_datasets", "CONFIG_FILE_REQUIRED"]

#: ``parser.error`` text of the tools that train or evaluate when ``--config-file`` is missing.
CONFIG_FILE_REQUIRED = (
    "--config-file is required: without it the bare defaults would be used (SparseInst on a "
    "FrozenBN ResNet-50 with random weights: MODEL.WEIGHTS empty, MODEL.BACKBONE.PRETRAINED False; "
    "frozen random BN statistics cannot train). Pick one under configs/, e.g. "
    "--config-file configs/sparseinst/R50_giam.yaml"
)


def add_allow_partial_weights_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--allow-partial-weights`` (``args.allow_partial_weights``): evaluate MODEL.WEIGHTS even
    when they do not fill the model (missing, unexpected or shape-mismatched tensors)."""
    parser.add_argument(
        "--allow-partial-weights",
        action="store_true",
        help="evaluate MODEL.WEIGHTS even when tensors are missing, unexpected or of another shape "
        "(another model family or class count, an ImageNet backbone file); default: an error",
    )
    return parser


def add_dataset_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the repeatable ``--dataset NAME JSON_FILE IMAGE_ROOT`` flag (``args.dataset``: list of
    ``[name, json_file, image_root]``, or ``None``) and its Cityscapes sibling, the repeatable
    ``--cityscapes NAME IMAGE_DIR GT_DIR`` (``args.cityscapes``: a folder pair in Cityscapes layout,
    e.g. ``.../leftImg8bit/val .../gtFine/val``, evaluated with cityscapesscripts), with
    ``--cityscapes-task {instance,semantic,panoptic}`` (``args.cityscapes_task``, default
    ``instance``) choosing how those splits are registered."""
    parser.add_argument(
        "--dataset",
        action="append",
        nargs=3,
        metavar=("NAME", "JSON_FILE", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME before the config is read "
        "(repeatable), so that DATASETS.TRAIN/TEST can name it",
    )
    parser.add_argument(
        "--cityscapes",
        action="append",
        nargs=3,
        metavar=("NAME", "IMAGE_DIR", "GT_DIR"),
        help="register a split in Cityscapes layout (IMAGE_DIR = leftImg8bit/<split>, GT_DIR = "
        "gtFine/<split>, one folder per city) under NAME (repeatable); evaluated with cityscapesscripts",
    )
    parser.add_argument(
        "--cityscapes-task",
        choices=("instance", "semantic", "panoptic"),
        default="instance",
        help="the task of every --cityscapes split: instance (default), semantic (the "
        "_labelTrainIds.png) or panoptic (GT_DIR/../cityscapes_panoptic_<split>{.json,/}); the "
        "semantic and panoptic files are written by datasets/prepare_cityscapes.py",
    )
    return parser


def default_argument_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """Parser with Detectron2's training flags.

    Flags: ``--config-file``, ``--dataset NAME JSON IMAGE_ROOT`` (repeatable), ``--num-gpus``,
    ``--num-machines``, ``--machine-rank``, ``--dist-url``, ``--resume``, ``--overwrite``,
    ``--eval-only``, ``--allow-partial-weights`` and the trailing ``opts`` (``KEY VALUE ...``
    config overrides, ``argparse.REMAINDER``). ``--config-file`` is not enforced by the parser
    (tools that need it check it, see :data:`CONFIG_FILE_REQUIRED`).
    """
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to a config file")
    add_dataset_argument(parser)
    parser.add_argument("--resume", action="store_true",
                        help="resume from the last checkpoint in OUTPUT_DIR if there is one")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an OUTPUT_DIR that holds another run's checkpoints, deleting them")
    parser.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS only")
    add_allow_partial_weights_argument(parser)
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs per machine")
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0,
                        help="the rank of this machine (unique per machine)")
    # A per-user port (as Detectron2 does) so that two users' jobs on one machine do not clash.
    port = 2**15 + 2**14 + hash(os.getuid() if sys.platform != "win32" else 1) % 2**14
    parser.add_argument("--dist-url", default=f"tcp://127.0.0.1:{port}",
                        help="initialization URL for multi-machine training")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. SOLVER.MAX_ITER 1000")
    return parser


def register_cli_datasets(args: argparse.Namespace) -> List[str]:
    """Register every ``--dataset NAME JSON_FILE IMAGE_ROOT`` with
    :func:`instseg.data.register_coco_instances`, then every ``--cityscapes NAME IMAGE_DIR GT_DIR``
    with :func:`instseg.data.register_cityscapes_instances` (``--cityscapes-task semantic``:
    :func:`~instseg.data.register_cityscapes_sem_seg`; ``panoptic``:
    :func:`~instseg.data.register_cityscapes_panoptic` with the panoptic json and PNG folder that
    ``datasets/prepare_cityscapes.py`` writes next to GT_DIR: ``GT_DIR/../cityscapes_panoptic_<split>``).

    Returns:
        The registered names, in command-line order (``[]`` without ``--dataset``).

    Raises:
        FileNotFoundError: a JSON_FILE, IMAGE_ROOT, IMAGE_DIR or GT_DIR does not exist.
    """
    entries = getattr(args, "dataset", None) or []
    cityscapes = getattr(args, "cityscapes", None) or []
    if not entries and not cityscapes:
        return []
    from instseg.data import register_cityscapes_instances, register_coco_instances  # lazy: keeps the CLI light

    names = []
    for name, json_file, image_root in entries:
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"--dataset {name}: json file not found: {json_file}")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"--dataset {name}: image root not found: {image_root}")
        register_coco_instances(name, json_file, image_root)
        names.append(name)
    for name, image_dir, gt_dir in cityscapes:
        for what, folder in (("IMAGE_DIR", image_dir), ("GT_DIR", gt_dir)):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"--cityscapes {name}: {what} not found: {folder}")
        task = getattr(args, "cityscapes_task", None) or "instance"
        if task == "semantic":
            from instseg.data import register_cityscapes_sem_seg

            register_cityscapes_sem_seg(name, image_dir, gt_dir)
        elif task == "panoptic":
            from instseg.data import register_cityscapes_panoptic
            from instseg.data.cityscapes_seg import panoptic_paths_of_gt_dir

            register_cityscapes_panoptic(name, image_dir, gt_dir, *panoptic_paths_of_gt_dir(gt_dir))
        else:
            register_cityscapes_instances(name, image_dir, gt_dir)
        names.append(name)
    return names


_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def split_trailing_opts(args: argparse.Namespace, attr: str) -> None:
    """``--input a.jpg MODEL.WEIGHTS w``: a list flag (``nargs="+"``, ``args.<attr>``) takes every
    word up to the next flag, so the first word that is a config key (``SECTION.KEY``, upper
    case, not an existing path) and all after it are moved to ``args.opts`` (in place)."""
    words = getattr(args, attr)
    if not words:
        return
    for i, word in enumerate(words):
        if _CONFIG_KEY.match(word) and not os.path.exists(word):
            args.opts = list(words[i:]) + list(args.opts or [])
            setattr(args, attr, words[:i])
            return
