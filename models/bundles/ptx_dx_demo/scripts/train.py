"""Train the ptx_dx_demo network on synthetic chest radiograph phantoms (CPU, deterministic).

Usage (from the repository root)::

    python models/bundles/ptx_dx_demo/scripts/train.py            # full: writes the bundle
    python models/bundles/ptx_dx_demo/scripts/train.py --quick --output /tmp/ptx  # smoke run

The full run generates the training and validation phantoms, trains the 2D
UNet of configs/inference.json with one CPU thread and fixed seeds, picks the
operating threshold on the validation set (Youden's J), writes
models/model.pt and the threshold into configs/triage.json, then runs
evaluate.py on the held-out test phantoms and writes docs/evaluation.json.
``--quick`` trains on a few phantoms for a couple of epochs into a copy of the
bundle (``--output``), to check that the script runs; it never overwrites
the committed weights.

The network segments: the loss is pixel-wise binary cross-entropy on the soft
pneumothorax fraction (positives weighted 5) plus a soft Dice over the batch.
The registry's image probability is the sigmoid of the largest pixel logit;
the operating threshold on it is chosen on the validation phantoms.
The loop itself is :func:`models.training.train_bundle`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BUNDLE, make_samples

from models.training import TrainingSettings, train_main

FULL = TrainingSettings(train=600, validation=100, epochs=12, batch=16, lr=1e-2)
QUICK = TrainingSettings(train=32, validation=16, epochs=1, batch=16, lr=1e-2)
POS_WEIGHT = 5.0
"""Pneumothorax pixels are about 3 % of the image."""
THRESHOLD_GRID = (*np.round(np.linspace(0.05, 0.99, 95), 2), 0.995, 0.998, 0.999)
"""The image probability is a maximum over pixels and saturates near 1: the grid runs to 0.999."""


def main(argv: list[str] | None = None) -> int:
    return train_main(
        argv,
        description=__doc__.splitlines()[0],
        bundle=BUNDLE,
        full=FULL,
        quick=QUICK,
        make_samples=make_samples,
        pos_weight=POS_WEIGHT,
        grid=THRESHOLD_GRID,
    )


if __name__ == "__main__":
    sys.exit(main())
