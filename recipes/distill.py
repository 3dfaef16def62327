"""Distill a dataset with G-VBSM end to end: ``gvbsm-hf distill`` (:mod:`gvbsm_hf.cli`) from a clone.

    accelerate launch recipes/distill.py --config recipes/fashion_mnist/gvbsm_ipc10_cpu.yaml
    accelerate launch recipes/distill.py --config recipes/digits/smoke.yaml --ipc 2 --redo recover
    python recipes/distill.py --config recipes/digits/smoke.yaml --dry_run

The same as ``gvbsm-hf distill ...`` and ``accelerate launch -m gvbsm_hf.cli distill ...`` (installed
with the package); ``--help`` lists every field of the recipe, errors exit with code 3, Ctrl-C /
SIGTERM with 130 / 143 (see :mod:`gvbsm_hf.cli`).
"""

from __future__ import annotations

import sys

from gvbsm_hf.cli import distill as cli
from gvbsm_hf.cli import distill_main as main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
