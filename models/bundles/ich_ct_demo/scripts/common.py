"""Data shared by train.py and evaluate.py: seeded synthetic head CT phantoms, preprocessed.

Every sample comes from :func:`models.phantoms.head_phantom` with a fixed seed
and goes through the bundle's own preprocessing (configs/inference.json via
:func:`models.registry.bundle_preprocessing`), so the network trains on
exactly what the registry feeds it at inference time.

Seed ranges (:mod:`models.training`) never overlap: training 0-99 999, test 100 000+,
validation 200 000+.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BUNDLE = Path(__file__).resolve().parents[1]
REPO = BUNDLE.parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.phantoms import head_phantom  # noqa: E402
from models.registry import bundle_preprocessing  # noqa: E402
from models.training import is_positive  # noqa: E402


@dataclass
class Samples:
    """Preprocessed images, voxel targets (fraction of hemorrhage) and study labels."""

    images: np.ndarray  # (n, 1, 64, 64, 64) float32
    targets: np.ndarray  # (n, 1, 64, 64, 64) float32 in [0, 1]
    labels: np.ndarray  # (n,) float32: 1 positive, 0 negative
    lesion_ml: np.ndarray  # (n,) true hemorrhage volume in ml


def geometry(seed: int, varied: bool) -> dict[str, int]:
    """Acquisition geometry: the demo default (40 x 256 x 256), or varied for training."""
    if not varied:
        return {"slices": 40, "rows": 256}
    rng = np.random.default_rng(10_000_000 + seed)
    return {"slices": int(rng.integers(28, 56)), "rows": int(rng.choice([128, 192, 256]))}


def make_samples(seeds: range | list[int], *, varied: bool) -> Samples:
    """Phantoms for `seeds`, through the bundle's preprocessing."""
    preprocess = bundle_preprocessing(BUNDLE)
    images, targets, labels, volumes = [], [], [], []
    for seed in seeds:
        phantom = head_phantom(seed, positive=is_positive(seed), **geometry(seed, varied))
        images.append(np.asarray(preprocess(phantom.hu.astype(np.float32)), dtype=np.float32))
        # The lesion mask through the same resize (area): the fraction of each voxel that bleeds.
        lesion = phantom.lesion.astype(np.float32) * 100.0  # window [0, 100] maps 100 to 1
        targets.append(np.asarray(preprocess(lesion), dtype=np.float32))
        labels.append(float(phantom.positive))
        volumes.append(phantom.lesion_ml)
    return Samples(
        images=np.stack(images),
        targets=np.stack(targets),
        labels=np.asarray(labels, dtype=np.float32),
        lesion_ml=np.asarray(volumes, dtype=np.float32),
    )
