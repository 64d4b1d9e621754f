#!/usr/bin/env python
"""Source-checkout wrapper of ``instseg-convert`` (the code: instseg/tools/convert_official_weights.py).

    python tools/convert_official_weights.py --model sparseinst sparse_inst_r50_giam_aug_2b7d68.pth out.pth
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from instseg.tools.convert_official_weights import (  # noqa: E402,F401  (re-exported as before)
    MODEL_KEY_TABLES,
    convert_official_state_dict,
    convert_with_report,
    main,
    official_keys_from_ref,
    read_weights_file,
)

if __name__ == "__main__":
    sys.exit(main())
