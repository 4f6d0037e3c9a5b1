"""Train the ptx_dx_demo network on synthetic chest radiograph phantoms (CPU, deterministic).

Usage (from the repository root)::

    python models/bundles/ptx_dx_demo/scripts/train.py            # full: writes the bundle
    python models/bundles/ptx_dx_demo/scripts/train.py --quick --output /tmp/ptx  # smoke run

The network is the 2D UNet of configs/inference.json. It segments: the loss
is pixel-wise binary cross-entropy on the soft pneumothorax fraction (positives
weighted 5) plus a soft Dice over the batch. The registry's image probability
is the sigmoid of the largest pixel logit.

Training, the choice of the operating threshold on the validation phantoms
(Youden's J) and the evaluation on the test phantoms are
:func:`models.training.train_main`; ``--quick`` never overwrites the
committed weights.
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
