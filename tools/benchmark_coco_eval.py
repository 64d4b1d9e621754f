#!/usr/bin/env python
"""Source-checkout wrapper of the COCO evaluation backend benchmark (the code: instseg/tools/benchmark_coco_eval.py).

    python tools/benchmark_coco_eval.py [--num-images 5000] [--dets-per-image 100] [--iou-type segm bbox] \\
        [--backends pycocotools faster_coco_eval hotcoco] [--rounds 2]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from instseg.tools.benchmark_coco_eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
