"""Record ``golden_outputs.json`` (see ``harness.py``). Run from the repository root:

    python tests/golden/record.py [MODEL ...]

Only re-record in a commit of its own that says which values moved and why (issue 9).
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import harness  # noqa: E402


def main(models):
    from instseg.engine.models import import_model_packages

    import_model_packages()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    coco128 = HERE.parents[2] / "shared" / "data" / "coco128-seg"
    path = HERE / "golden_outputs.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    for name in models or list(harness.DEFAULT_CONFIGS):
        data[name] = harness.compute(name, coco128)
        print(name, {k: round(v, 4) for k, v in data[name]["losses"].items()},
              [len(o["scores"]) for o in data[name]["outputs"]])
    path.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
