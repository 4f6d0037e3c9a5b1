"""Train the ich_ct_demo network on synthetic head CT phantoms (CPU, deterministic).

Usage (from the repository root)::

    python models/bundles/ich_ct_demo/scripts/train.py            # full: writes the bundle
    python models/bundles/ich_ct_demo/scripts/train.py --quick --output /tmp/ich  # smoke run

The full run generates the training and validation phantoms, trains the 3D
UNet of configs/inference.json with one CPU thread and fixed seeds, picks the
operating threshold on the validation set (Youden's J), writes
models/model.pt and the threshold into configs/triage.json, then runs
evaluate.py on the held-out test phantoms and writes docs/evaluation.json.
``--quick`` trains on a few phantoms for a couple of epochs into a copy of the
bundle (``--output``), to check that the script runs; it never overwrites
the committed weights.

The network segments: the loss is voxel-wise binary cross-entropy on the soft
hemorrhage fraction (positives weighted 20) plus a soft Dice over the batch.
The registry's study probability is the sigmoid of the largest voxel logit;
the operating threshold on it is chosen on the validation phantoms.
The loop itself is :func:`models.training.train_bundle`.
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
