"""Command-line helpers shared by the tools (Detectron2-style flags, docs/architecture.md "Tools").

``default_argument_parser`` is ``tools/train_net.py``'s full set of flags; other tools may build
their own parser and call :func:`add_dataset_argument` and :func:`register_cli_datasets` so that
every tool understands ``--dataset NAME JSON_FILE IMAGE_ROOT``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

__all__ = ["default_argument_parser", "add_dataset_argument", "register_cli_datasets"]


def add_dataset_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the repeatable ``--dataset NAME JSON_FILE IMAGE_ROOT`` flag (``args.dataset``: list of
    ``[name, json_file, image_root]``, or ``None``)."""
    parser.add_argument(
        "--dataset",
        action="append",
        nargs=3,
        metavar=("NAME", "JSON_FILE", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME before the config is read "
        "(repeatable), so that DATASETS.TRAIN/TEST can name it",
    )
    return parser


def default_argument_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """Parser with Detectron2's training flags.

    Flags: ``--config-file``, ``--dataset NAME JSON IMAGE_ROOT`` (repeatable), ``--num-gpus``,
    ``--num-machines``, ``--machine-rank``, ``--dist-url``, ``--resume``, ``--eval-only`` and the
    trailing ``opts`` (``KEY VALUE ...`` config overrides, ``argparse.REMAINDER``).
    """
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to a config file")
    add_dataset_argument(parser)
    parser.add_argument("--resume", action="store_true",
                        help="resume from the last checkpoint in OUTPUT_DIR if there is one")
    parser.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS only")
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
    :func:`instseg.data.register_coco_instances`.

    Returns:
        The registered names, in command-line order (``[]`` without ``--dataset``).

    Raises:
        FileNotFoundError: a JSON_FILE or IMAGE_ROOT does not exist.
    """
    entries = getattr(args, "dataset", None) or []
    if not entries:
        return []
    from instseg.data import register_coco_instances  # lazy: keeps the CLI helper light

    names = []
    for name, json_file, image_root in entries:
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"--dataset {name}: json file not found: {json_file}")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"--dataset {name}: image root not found: {image_root}")
        register_coco_instances(name, json_file, image_root)
        names.append(name)
    return names
