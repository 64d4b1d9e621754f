#!/usr/bin/env python
"""Source-checkout wrapper of ``instseg-demo`` (the code: instseg/tools/demo.py).

    python tools/demo.py --config-file F --input IMAGES_OR_VIDEO --output OUT MODEL.WEIGHTS W
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from instseg.tools.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
