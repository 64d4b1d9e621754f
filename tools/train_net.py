#!/usr/bin/env python
"""Source-checkout wrapper of ``instseg-train`` (the code: instseg/tools/train_net.py).

    python tools/train_net.py --config-file configs/sparseinst/R50_giam.yaml \
        [--dataset NAME JSON_FILE IMAGE_ROOT] [--num-gpus N] [--resume] [--eval-only] [KEY VALUE ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from instseg.tools.train_net import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
