#!/usr/bin/env python
"""Prepare PneumoniaMNIST (MedMNIST v2, 2D 28x28 chest X-ray, normal vs pneumonia).

Usage: python sample_data_scripts/prepare_pneumoniamnist.py --output DIR [--mirror DIR] [--max-per-split N] ...
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
    sys.exit(main_for("pneumoniamnist"))
