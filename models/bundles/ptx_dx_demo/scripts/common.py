"""Data shared by train.py and evaluate.py: seeded synthetic chest radiographs, preprocessed.

Every sample comes from :func:`models.phantoms.chest_radiograph` with a fixed
seed and goes through the bundle's own preprocessing (configs/inference.json
via :func:`models.registry.bundle_preprocessing`). The pneumothorax mask is
resized the same way (area interpolation) as the voxel target.

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

from models.phantoms import chest_radiograph  # noqa: E402
from models.registry import bundle_preprocessing  # noqa: E402
from models.training import is_positive  # noqa: E402

SPATIAL_SIZE = (128, 128)


@dataclass
class Samples:
    """Preprocessed images, pixel targets (fraction of pneumothorax) and image labels."""

    images: np.ndarray  # (n, 1, 128, 128) float32
    targets: np.ndarray  # (n, 1, 128, 128) float32 in [0, 1]
    labels: np.ndarray  # (n,) float32


def rows(seed: int, varied: bool) -> int:
    """Matrix size: the demo default (512), or varied for training."""
    if not varied:
        return 512
    return int(np.random.default_rng(10_000_000 + seed).choice([384, 512, 640]))


def make_samples(seeds: range | list[int], *, varied: bool) -> Samples:
    """Phantoms for `seeds`, through the bundle's preprocessing."""
    from monai.transforms import Resize

    preprocess = bundle_preprocessing(BUNDLE)
    resize = Resize(spatial_size=SPATIAL_SIZE, mode="area")
    images, targets, labels = [], [], []
    for seed in seeds:
        phantom = chest_radiograph(seed, positive=is_positive(seed), rows=rows(seed, varied))
        pixels = phantom.pixels.astype(np.float32)[np.newaxis]  # a one-image Volume's array
        images.append(np.asarray(preprocess(pixels), dtype=np.float32))
        lesion = phantom.lesion.astype(np.float32)[np.newaxis]
        targets.append(np.asarray(resize(lesion), dtype=np.float32))
        labels.append(float(phantom.positive))
    return Samples(
        images=np.stack(images),
        targets=np.stack(targets),
        labels=np.asarray(labels, dtype=np.float32),
    )
