#!/usr/bin/env python
"""Source-checkout wrapper of ``instseg-check-dataset`` (the code: instseg/tools/check_dataset.py).

    python tools/check_dataset.py --config-file F [--dataset NAME JSON ROOT] [KEY VALUE ...]
    python tools/check_dataset.py --dataset NAME JSON ROOT
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from instseg.tools.check_dataset import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
