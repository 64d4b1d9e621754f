"""Check datasets before training: every annotation and every image file, all problems at once.

    instseg-check-dataset --config-file F [--dataset NAME JSON ROOT] [KEY VALUE ...]
    instseg-check-dataset --dataset NAME JSON ROOT [--dataset ...]
    python tools/check_dataset.py ...     # the same, from a source checkout

With ``--config-file`` the datasets of ``DATASETS.TRAIN`` and ``DATASETS.TEST`` are checked
(``--dataset`` entries are registered first, so that the config can name them); with
``--dataset`` alone, those datasets. For each: the json is loaded with validation
(:func:`instseg.data.load_coco_json`: every invalid image/annotation entry is listed, clipped and
dropped annotations counted) and every image is opened as the mapper opens it
(:func:`instseg.data.check_dataset_files`: missing, truncated/corrupt and mis-sized files).

Exit status: 0 when every dataset is clean, 1 when a problem was found (the report lists them),
2 on usage errors.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from instseg.utils.cli import add_dataset_argument

__all__ = ["get_parser", "check", "run", "main"]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="", metavar="FILE", help="check the config's DATASETS.TRAIN and TEST")
    add_dataset_argument(p)
    p.add_argument("--workers", type=int, default=None, help="threads opening images (default min(8, CPUs))")
    p.add_argument("--no-images", action="store_true", help="check the annotations only")
    p.add_argument("--max-listed", type=int, default=200, help="problems listed per dataset (default 200)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


class _Counter(logging.Handler):
    """Collects the load-time warnings (clipped/dropped summaries) of instseg.data."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check(names: List[str], workers: Optional[int] = None, images: bool = True, max_listed: int = 200,
          out=None) -> int:
    """Check registered datasets ``names``; print a report to ``out`` (default stdout).

    Returns:
        The number of problems found (0: clean).
    """
    from instseg.data import DatasetCatalog, DatasetError, check_dataset_files
    from instseg.data.validation import AnnotationError, DatasetFilesError, iter_problems

    out = out or sys.stdout
    total = 0
    handler = _Counter()
    data_logger = logging.getLogger("instseg.data")
    data_logger.addHandler(handler)
    try:
        for name in dict.fromkeys(names):
            handler.messages.clear()
            print(f"== {name}", file=out)
            try:
                dicts = DatasetCatalog.get(name)
            except AnnotationError as e:
                total += len(e.problems)
                print(f"  annotations: {len(e.problems)} invalid entr{'y' if len(e.problems) == 1 else 'ies'}", file=out)
                print(iter_problems(e.problems, max_listed), file=out)
                continue
            except (DatasetError, FileNotFoundError, KeyError) as e:
                total += 1
                print(f"  cannot load: {e}", file=out)
                continue
            n_ann = sum(len(d.get("annotations", [])) for d in dicts)
            print(f"  annotations: OK ({len(dicts)} images, {n_ann} annotations kept)", file=out)
            for m in handler.messages:
                print(f"  warning: {m}", file=out)
            if not images:
                continue
            try:
                n = check_dataset_files(dicts, num_workers=workers, max_listed=max_listed, desc=f"Images of {name}")
                print(f"  images: OK ({n} files readable, sizes match the json)", file=out)
            except DatasetFilesError as e:
                total += len(e.problems)
                print("  images: " + str(e).replace("\n", "\n  "), file=out)
    finally:
        data_logger.removeHandler(handler)
    print(f"{total} problem(s) found" if total else "No problems found", file=out)
    return total


def run(argv=None) -> int:
    """Parse ``argv``, check the datasets, return the exit status (0 clean, 1 problems)."""
    p = get_parser()
    args = p.parse_args(argv)
    if not args.config_file and not args.dataset:
        p.error("give --config-file (checks DATASETS.TRAIN and TEST) or --dataset NAME JSON ROOT")
    from instseg.data import DatasetError

    try:
        if args.config_file:
            from instseg.engine.launch import setup_cfg_from_args

            cfg = setup_cfg_from_args(args)
            names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
        else:
            if args.opts:
                p.error("KEY VALUE overrides need --config-file")
            from instseg.utils.cli import register_cli_datasets

            names = register_cli_datasets(args)
    except (DatasetError, FileNotFoundError, KeyError) as e:  # invalid JSON, an unregistered name
        print(f"cannot set up the datasets: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 1
    if not names:
        p.error("no dataset to check (DATASETS.TRAIN and DATASETS.TEST are empty)")
    return 1 if check(names, workers=args.workers, images=not args.no_images, max_listed=args.max_listed) else 0


def main(argv=None) -> int:
    """Console script ``instseg-check-dataset``: :func:`run`'s exit status."""
    return run(argv)


if __name__ == "__main__":
    raise SystemExit(main())
