#!/usr/bin/env python
"""Source-checkout wrapper of ``instseg-export`` (the code: instseg/tools/export_model.py).

    python tools/export_model.py --format onnx --config-file F --output model.onnx MODEL.WEIGHTS W
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from instseg.tools.export_model import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
