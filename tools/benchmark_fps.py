#!/usr/bin/env python
"""Source-checkout wrapper of ``instseg-benchmark`` (the code: instseg/tools/benchmark_fps.py).

    python tools/benchmark_fps.py --config-file F [--images DIR | --test-set | --input-size H W] ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from instseg.tools.benchmark_fps import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
