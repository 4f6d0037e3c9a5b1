"""Train the ich_ct_demo network on synthetic head CT phantoms (CPU, deterministic).

Usage (from the repository root)::

    python models/bundles/ich_ct_demo/scripts/train.py            # full: writes the bundle
    python models/bundles/ich_ct_demo/scripts/train.py --quick --output /tmp/ich  # smoke run

The network is the 3D UNet of configs/inference.json. It segments: the loss
is voxel-wise binary cross-entropy on the soft hemorrhage fraction (positives
weighted 20) plus a soft Dice over the batch. The registry's study probability
is the sigmoid of the largest voxel logit.

Training, the choice of the operating threshold on the validation phantoms
(Youden's J) and the evaluation on the test phantoms are
:func:`models.training.train_main`; ``--quick`` never overwrites the
committed weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BUNDLE, make_samples

from models.training import TrainingSettings, train_main

FULL = TrainingSettings(train=320, validation=64, epochs=12, batch=4, lr=1e-2)
QUICK = TrainingSettings(train=16, validation=8, epochs=1, batch=4, lr=1e-2)
POS_WEIGHT = 20.0
"""Hemorrhage voxels are about 0.5 % of the volume."""


def main(argv: list[str] | None = None) -> int:
    return train_main(
        argv,
        description=__doc__.splitlines()[0],
        bundle=BUNDLE,
        full=FULL,
        quick=QUICK,
        make_samples=make_samples,
        pos_weight=POS_WEIGHT,
    )


if __name__ == "__main__":
    sys.exit(main())
