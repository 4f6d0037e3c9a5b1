"""Evaluate the ptx_dx_demo bundle on held-out synthetic chest radiograph phantoms.

Usage (from the repository root)::

    python models/bundles/ptx_dx_demo/scripts/evaluate.py            # prints the numbers
    python models/bundles/ptx_dx_demo/scripts/evaluate.py --write    # also docs/evaluation.json

The bundle is installed through the registry (:func:`models.registry.validate_bundle`)
and run with :meth:`InstalledModel.predict_batch` on phantoms in the geometry of
:func:`models.phantoms.write_chest_dx` (one 512 x 512 image), seeds
100 000 onwards, half positive. Reports AUC, sensitivity and specificity at the
bundle's operating threshold, and the time taken (:func:`models.training.evaluate_bundle`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BUNDLE, rows

from models.phantoms import chest_radiograph
from models.training import HeldOutPhantom, evaluate_bundle, evaluate_main, is_positive
from pipeline.volume import Volume

DEFAULT_TEST_PHANTOMS = 200


def phantom_volume(seed: int) -> HeldOutPhantom:
    """A test phantom as the one-image Volume the flow would load from its DICOM file."""
    phantom = chest_radiograph(seed, positive=is_positive(seed), rows=rows(seed, varied=False))
    volume = Volume(
        pixels=phantom.pixels.astype(np.float32)[np.newaxis],
        spacing=(1.0, phantom.spacing, phantom.spacing),
        origin=(0.0, 0.0, 0.0),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        sop_instance_uids=(f"2.25.{seed}.1",),
        modality="DX",
        series_instance_uid=f"2.25.{seed}",
    )
    return HeldOutPhantom(volume, phantom.positive)


def evaluate(bundle: Path, n: int = DEFAULT_TEST_PHANTOMS) -> dict[str, object]:
    """Run the bundle on `n` test phantoms and return its evaluation numbers."""
    return evaluate_bundle(
        bundle,
        n,
        phantom_volume,
        test_set=lambda seeds: (
            f"synthetic PA chest radiograph phantoms, "
            f"seeds {seeds[0]}-{seeds[-1]}, 512 x 512, half positive"
        ),
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
