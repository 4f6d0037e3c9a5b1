"""Evaluate the ich_ct_demo bundle on held-out synthetic head CT phantoms.

Usage (from the repository root)::

    python models/bundles/ich_ct_demo/scripts/evaluate.py            # prints the numbers
    python models/bundles/ich_ct_demo/scripts/evaluate.py --write    # also docs/evaluation.json

The bundle is installed through the registry (:func:`models.registry.validate_bundle`)
and run with :meth:`InstalledModel.predict_batch` on phantoms in the geometry of
:func:`models.phantoms.write_head_ct` (40 slices of 4 mm, 256 x 256), seeds
100 000 onwards, half positive. Reports AUC, sensitivity and specificity at the
bundle's operating threshold, and the hemorrhage volume error on true positives
(:func:`models.training.evaluate_bundle`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BUNDLE, geometry

from models.phantoms import head_phantom
from models.training import HeldOutPhantom, evaluate_bundle, evaluate_main, is_positive
from pipeline.volume import Volume

DEFAULT_TEST_PHANTOMS = 100


def phantom_volume(seed: int) -> HeldOutPhantom:
    """A test phantom as the Volume the flow would load from its DICOM files."""
    phantom = head_phantom(seed, positive=is_positive(seed), **geometry(seed, varied=False))
    volume = Volume(
        pixels=phantom.hu.astype(np.float32),
        spacing=phantom.spacing,
        origin=(0.0, 0.0, 0.0),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        sop_instance_uids=tuple(f"2.25.{seed}.{k + 1}" for k in range(phantom.hu.shape[0])),
        modality="CT",
        series_instance_uid=f"2.25.{seed}",
    )
    return HeldOutPhantom(volume, phantom.positive, phantom.lesion_ml)


def evaluate(bundle: Path, n: int = DEFAULT_TEST_PHANTOMS) -> dict[str, object]:
    """Run the bundle on `n` test phantoms and return its evaluation numbers."""
    return evaluate_bundle(
        bundle,
        n,
        phantom_volume,
        test_set=lambda seeds: (
            f"synthetic head CT phantoms, seeds {seeds[0]}-{seeds[-1]}, "
            "40 x 256 x 256, 4 mm slices, half positive"
        ),
        measure_volume=True,
    )


def main(argv: list[str] | None = None) -> int:
    return evaluate_main(
        argv,
        description=__doc__.splitlines()[0],
        bundle=BUNDLE,
        default_n=DEFAULT_TEST_PHANTOMS,
        evaluate=evaluate,
    )


if __name__ == "__main__":
    sys.exit(main())
