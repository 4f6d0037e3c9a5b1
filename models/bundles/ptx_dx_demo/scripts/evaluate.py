"""Evaluate the ptx_dx_demo bundle on held-out synthetic chest radiograph phantoms.

Usage (from the repository root)::

    python models/bundles/ptx_dx_demo/scripts/evaluate.py            # prints the numbers
    python models/bundles/ptx_dx_demo/scripts/evaluate.py --write    # also docs/evaluation.json

The bundle is installed through the registry (:func:`models.registry.validate_bundle`)
and run with :meth:`InstalledModel.predict_batch` on phantoms in the geometry of
:func:`models.phantoms.write_chest_dx` (one 512 x 512 image), seeds
100 000 onwards, half positive. Reports AUC, sensitivity and specificity at the
bundle's operating threshold, and the time taken.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BUNDLE, TEST_SEEDS, is_positive, rows

from models.phantoms import chest_radiograph
from models.registry import validate_bundle
from pipeline.volume import Volume

DEFAULT_TEST_PHANTOMS = 200


def phantom_volume(seed: int) -> tuple[Volume, bool, float]:  # (volume, positive, unused)
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
    return volume, phantom.positive, 0.0


def evaluate(bundle: Path, n: int = DEFAULT_TEST_PHANTOMS) -> dict[str, object]:
    """Run the bundle on `n` test phantoms and return its evaluation numbers."""
    from monai.metrics import compute_roc_auc

    torch.set_num_threads(1)
    model = validate_bundle(bundle)
    threshold = model.findings[0].threshold
    probabilities, labels = [], []
    started = time.perf_counter()
    seeds = list(TEST_SEEDS)[:n]
    for start in range(0, n, 4):
        batch = [phantom_volume(seed) for seed in seeds[start : start + 4]]
        results = model.predict_batch([v for v, _, _ in batch])
        for (_, positive, _), result in zip(batch, results, strict=True):
            finding = result.findings[0]
            probabilities.append(finding.probability)
            labels.append(int(positive))
    p = np.asarray(probabilities)
    y = np.asarray(labels)
    predicted = p >= threshold
    auc = float(compute_roc_auc(torch.from_numpy(p), torch.from_numpy(y)))
    return {
        "model": model.name,
        "version": model.version,
        "weights_sha256": model.identity.weights_sha256,
        "test_set": f"synthetic PA chest radiograph phantoms, seeds {seeds[0]}-{seeds[-1]}, "
        "512 x 512, half positive",
        "n_test": n,
        "n_positive": int(y.sum()),
        "threshold": threshold,
        "auc": round(auc, 4),
        "sensitivity": round(float(predicted[y == 1].mean()), 4),
        "specificity": round(float((~predicted[y == 0]).mean()), 4),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--n", type=int, default=DEFAULT_TEST_PHANTOMS)
    parser.add_argument("--write", action="store_true", help="write docs/evaluation.json")
    args = parser.parse_args(argv)
    numbers = evaluate(args.bundle, args.n)
    text = json.dumps(numbers, indent=2)
    print(text)
    if args.write:
        stored = {k: v for k, v in numbers.items() if k != "seconds"}
        (args.bundle / "docs" / "evaluation.json").write_text(json.dumps(stored, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
