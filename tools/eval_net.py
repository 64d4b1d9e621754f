#!/usr/bin/env python
"""Source-checkout wrapper of ``instseg-eval`` (the code: instseg/tools/eval_net.py).

    python tools/eval_net.py --config-file F [--dataset NAME JSON ROOT] [--per-category] MODEL.WEIGHTS W
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from instseg.tools.eval_net import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
