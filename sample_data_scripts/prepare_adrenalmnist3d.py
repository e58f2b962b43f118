#!/usr/bin/env python
"""Prepare AdrenalMNIST3D (MedMNIST v2, 3D adrenal shape masks, normal vs hyperplasia; --size 28|64).

Usage: python sample_data_scripts/prepare_adrenalmnist3d.py --output DIR [--mirror DIR] [--max-per-split N] ...
All logic lives in monai_fedkd.data.prepare; see sample_data_scripts/README.md.
"""

import sys
from pathlib import Path

try:
    from monai_fedkd.data.prepare import main_for
except ImportError:  # running from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from monai_fedkd.data.prepare import main_for

if __name__ == "__main__":
    sys.exit(main_for("adrenalmnist3d"))
