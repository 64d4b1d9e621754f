"""Convert an official checkpoint (Detectron2 naming: SparseInst, FastInst, ...) to ours.

Usage:
    instseg-convert --model sparseinst sparse_inst_r50_giam_aug_2b7d68.pth out.pth
    python tools/convert_official_weights.py ...   # the same, from a source checkout
    instseg-eval --config-file configs/... MODEL.WEIGHTS out.pth

INPUT may be a Detectron2 ``.pth`` (``{"model": state_dict, ...}``), a plain state dict, or a
Detectron2 ``.pkl`` (pickled numpy arrays). OUTPUT is a torch file
``{"model": state_dict, "__converted_from__": "official-<model>"}``. The key mapping lives in
:mod:`instseg.convert` (importable: ``convert_official_state_dict``, ``official_keys_from_ref``);
the ``--model`` choices are the installed model packages that registered a key table there
(``instseg.convert.model_key_tables()``, e.g. ``sparseinst/convert.py``).
"""
from __future__ import annotations

import argparse
import logging
import os

from instseg.convert import (  # noqa: F401  (re-exported for scripts that import the tool)
    MODEL_KEY_TABLES,
    convert_official_state_dict,
    convert_with_report,
    model_key_tables,
    official_keys_from_ref,
    read_weights_file,
)

__all__ = ["get_parser", "main"]


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the installed model packages are loaded here: each registers its table when imported
    parser.add_argument("--model", required=True, choices=sorted(model_key_tables()),
                        help="official model family (the installed models with a key table)")
    parser.add_argument("input", help="official checkpoint (.pth / .pkl)")
    parser.add_argument("output", help="converted checkpoint to write (.pth)")
    return parser


def main(argv=None) -> int:
    """Console script ``instseg-convert``: convert, print a summary, exit status 0."""
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    state_dict = read_weights_file(args.input)
    converted, report = convert_with_report(state_dict, args.model)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"model": converted, "__converted_from__": f"official-{args.model}"}, args.output)
    counts = report.counts()
    backbone_prefix = model_key_tables()[args.model.lower()].backbone_prefix
    n_backbone = sum(1 for k in converted if k.startswith(backbone_prefix))
    print(
        f"{args.input}: {len(state_dict)} keys -> {len(converted)} written to {args.output} "
        f"({counts['converted']} renamed or kept by rule, {n_backbone} of them backbone; "
        f"{counts['dropped']} dropped; {counts['unmatched']} matched no rule and kept as they are)"
    )
    if report.unmatched:
        print("unmatched:", ", ".join(report.unmatched[:20]) + (" ..." if len(report.unmatched) > 20 else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
