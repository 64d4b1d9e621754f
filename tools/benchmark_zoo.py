#!/usr/bin/env python
"""Source-checkout wrapper of ``instseg-benchmark-zoo`` (the code: instseg/tools/benchmark_zoo.py).

    python tools/benchmark_zoo.py [--config-files A.yaml B.yaml ... | --paper-rows] [--images DIR] [--scaling] ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from instseg.tools.benchmark_zoo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
