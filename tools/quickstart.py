#!/usr/bin/env python
"""Source-checkout wrapper of ``instseg-quickstart`` (the code: instseg/tools/quickstart.py).

    python tools/quickstart.py                       # generated smoke_shapes dataset (no download)
    python tools/quickstart.py --dataset NAME JSON_FILE IMAGE_ROOT [--val-dataset NAME JSON ROOT]
    python tools/quickstart.py --config-file F [KEY VALUE ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from instseg.tools.quickstart import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
