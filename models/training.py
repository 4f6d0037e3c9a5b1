"""Training and evaluation shared by the shipped demo bundles' scripts.

Each bundle's ``scripts/train.py`` and ``scripts/evaluate.py`` supply only what
is specific to the bundle (its phantoms, loss weighting, threshold grid and
settings) and call into this module for the rest: deterministic seeding, the
training loop, choosing the operating threshold, writing the weights and the
training record, and measuring the installed bundle on held-out phantoms.
Nothing here runs at import time, and nothing writes outside the bundle folder
it is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pipeline.volume import Volume

TRAIN_SEEDS = range(0, 100_000)
TEST_SEEDS = range(100_000, 200_000)
VALIDATION_SEEDS = range(200_000, 300_000)

YOUDEN_GRID: tuple[float, ...] = tuple(float(v) for v in np.round(np.linspace(0.05, 0.95, 91), 2))
"""Candidate operating thresholds: 0.05 to 0.95 in steps of 0.01."""


def is_positive(seed: int) -> bool:
    """Half the seeds are positive, alternating, so every range is balanced."""
    return seed % 2 == 0


class Samples(Protocol):
    """Preprocessed training data: images, soft segmentation targets, study labels."""

    images: np.ndarray
    targets: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class TrainingSettings:
    """How many phantoms, epochs, the batch size and the learning rate of one run."""

    train: int
    validation: int
    epochs: int
    batch: int
    lr: float = 1e-2


def make_deterministic() -> None:
    """One CPU thread, fixed torch seed and deterministic kernels: reruns give the same weights."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)


def build_network(bundle: Path) -> torch.nn.Module:
    """The network of the bundle's inference.json (``network_def``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    return parser.get_parsed_content("network_def", instantiate=True)


def segmentation_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, pos_weight: float
) -> torch.Tensor:
    """Element-wise BCE (lesion elements weighted `pos_weight`) plus a soft Dice over the batch."""
    elementwise = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets, pos_weight=torch.tensor(pos_weight)
    )
    probs = torch.sigmoid(logits)
    intersection = (probs * targets).sum()
    dice = 1.0 - (2.0 * intersection + 1.0) / (probs.sum() + targets.sum() + 1.0)
    return elementwise + dice


def study_probabilities(network: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """The sigmoid of each image's largest logit, as the registry computes it."""
    network.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), 8):
            logits = network(torch.from_numpy(images[start : start + 8]))
            out.append(torch.sigmoid(logits.flatten(1).max(dim=1).values).numpy())
    return np.concatenate(out)


def youden_threshold(
    probabilities: np.ndarray, labels: np.ndarray, grid: Sequence[float] = YOUDEN_GRID
) -> float:
    """The threshold in `grid` maximising sensitivity + specificity - 1; ties go nearest 0.5."""
    best, best_j = 0.5, -1.0
    for t in sorted(grid, key=lambda v: abs(v - 0.5)):
        predicted = probabilities >= t
        sensitivity = predicted[labels == 1].mean()
        specificity = (~predicted[labels == 0]).mean()
        j = sensitivity + specificity - 1.0
        if j > best_j + 1e-9:
            best, best_j = float(t), float(j)
    return best


def train_bundle(
    output: Path,
    settings: TrainingSettings,
    make_samples: Callable[..., Samples],
    *,
    pos_weight: float,
    grid: Sequence[float] = YOUDEN_GRID,
) -> float:
    """Train the network of the bundle at `output`, write its weights and threshold.

    Parameters
    ----------
    output
        The bundle folder: its inference.json defines the network, and
        models/model.pt, configs/triage.json and docs/training.json are written.
    settings
        Phantom counts, epochs, batch size and learning rate.
    make_samples
        ``make_samples(seeds, varied=...)``: the bundle's preprocessed phantoms.
    pos_weight
        Weight of lesion elements in the BCE term of :func:`segmentation_loss`.
    grid
        Candidate thresholds for :func:`youden_threshold`.

    Returns
    -------
    float
        The operating threshold chosen on the validation phantoms.
    """
    from monai.metrics import compute_roc_auc

    make_deterministic()
    started = time.perf_counter()
    train = make_samples(list(TRAIN_SEEDS)[: settings.train], varied=True)
    validation = make_samples(list(VALIDATION_SEEDS)[: settings.validation], varied=False)
    print(
        f"data: {len(train.labels)} train, {len(validation.labels)} validation phantoms "
        f"in {time.perf_counter() - started:.0f} s",
        flush=True,
    )

    network = build_network(output)
    optimizer = torch.optim.Adam(network.parameters(), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    generator = np.random.default_rng(0)
    for epoch in range(settings.epochs):
        network.train()
        order = generator.permutation(len(train.labels))
        total = 0.0
        for start in range(0, len(order), settings.batch):
            index = order[start : start + settings.batch]
            images = torch.from_numpy(train.images[index])
            targets = torch.from_numpy(train.targets[index])
            if generator.random() < 0.5:  # left-right flip (the last axis: columns)
                images, targets = images.flip(-1), targets.flip(-1)
            optimizer.zero_grad()
            loss = segmentation_loss(network(images), targets, pos_weight=pos_weight)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        scheduler.step()
        val = study_probabilities(network, validation.images)
        val_auc = float(compute_roc_auc(torch.from_numpy(val), torch.from_numpy(validation.labels)))
        print(
            f"epoch {epoch + 1}/{settings.epochs}: loss {total / len(order):.4f}, "
            f"validation AUC {val_auc:.3f}, "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )

    threshold = youden_threshold(
        study_probabilities(network, validation.images), validation.labels, grid
    )
    network.eval()
    torch.save(network.state_dict(), output / "models" / "model.pt")
    triage_file = output / "configs" / "triage.json"
    triage = json.loads(triage_file.read_text())
    triage["findings"][0]["threshold"] = threshold
    triage_file.write_text(json.dumps(triage, indent=2) + "\n")
    training = {
        "train_phantoms": settings.train,
        "validation_phantoms": settings.validation,
        "epochs": settings.epochs,
        "seconds": round(time.perf_counter() - started, 1),
        "threshold": threshold,
        "threads": 1,
    }
    (output / "docs" / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    print(f"weights written to {output / 'models' / 'model.pt'}; threshold {threshold}", flush=True)
    return threshold


def train_main(
    argv: list[str] | None,
    *,
    description: str,
    bundle: Path,
    full: TrainingSettings,
    quick: TrainingSettings,
    make_samples: Callable[..., Samples],
    pos_weight: float,
    grid: Sequence[float] = YOUDEN_GRID,
) -> int:
    """The command line of a bundle's train.py: train, then run its evaluate.py with ``--write``.

    The full run trains the bundle's network on `full` settings with one CPU
    thread and fixed seeds (:func:`train_bundle`), writes models/model.pt, the
    threshold in configs/triage.json and docs/training.json, then runs the
    bundle's scripts/evaluate.py on the held-out test phantoms, which writes
    docs/evaluation.json. ``--quick`` trains on `quick` settings into a copy
    of the bundle given by ``--output`` (evaluated on 16 test phantoms), to
    check that the script runs; it refuses to write into the committed bundle.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a few phantoms, one epoch")
    parser.add_argument("--output", type=Path, default=None, help="bundle folder to write")
    args = parser.parse_args(argv)
    output = args.output or bundle
    if args.quick and output.resolve() == bundle:
        parser.error("--quick needs --output elsewhere than the committed bundle")
    if output.resolve() != bundle:
        shutil.copytree(
            bundle, output, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    train_bundle(
        output, quick if args.quick else full, make_samples, pos_weight=pos_weight, grid=grid
    )
    evaluate = bundle / "scripts" / "evaluate.py"
    extra = ["--n", "16"] if args.quick else []
    return subprocess.call(
        [sys.executable, str(evaluate), "--bundle", str(output), "--write", *extra]
    )


@dataclass(frozen=True)
class HeldOutPhantom:
    """A held-out phantom as the flow would load it, with its truth."""

    volume: Volume
    positive: bool
    lesion_ml: float | None = None
    """True lesion volume in ml; None where the modality has no volume (projection images)."""


def evaluate_bundle(
    bundle: Path,
    n: int,
    test_phantom: Callable[[int], HeldOutPhantom],
    *,
    test_set: Callable[[list[int]], str],
    measure_volume: bool = False,
) -> dict[str, object]:
    """Install `bundle` through the registry and measure it on `n` held-out test phantoms.

    Parameters
    ----------
    bundle
        The bundle folder, installed with :func:`models.registry.validate_bundle`.
    n
        Number of test phantoms, from the first of :data:`TEST_SEEDS`.
    test_phantom
        The bundle's test phantom for a seed.
    test_set
        Describes the test set, given the seeds used.
    measure_volume
        Also report ``volume_mae_ml``, the mean absolute lesion volume error on
        true positives.

    Returns
    -------
    dict
        Model identity, test set, threshold, AUC, sensitivity, specificity
        (rounded to 4 decimals) and the seconds taken.
    """
    from monai.metrics import compute_roc_auc

    from models.registry import validate_bundle

    torch.set_num_threads(1)
    model = validate_bundle(bundle)
    threshold = model.findings[0].threshold
    probabilities, labels, errors = [], [], []
    started = time.perf_counter()
    seeds = list(TEST_SEEDS)[:n]
    for start in range(0, n, 4):
        batch = [test_phantom(seed) for seed in seeds[start : start + 4]]
        results = model.predict_batch([phantom.volume for phantom in batch])
        for phantom, result in zip(batch, results, strict=True):
            finding = result.findings[0]
            probabilities.append(finding.probability)
            labels.append(int(phantom.positive))
            if (
                phantom.positive
                and finding.present
                and finding.volume_ml is not None
                and phantom.lesion_ml is not None
            ):
                errors.append(abs(finding.volume_ml - phantom.lesion_ml))
    p = np.asarray(probabilities)
    y = np.asarray(labels)
    predicted = p >= threshold
    auc = float(compute_roc_auc(torch.from_numpy(p), torch.from_numpy(y)))
    numbers: dict[str, object] = {
        "model": model.name,
        "version": model.version,
        "weights_sha256": model.identity.weights_sha256,
        "test_set": test_set(seeds),
        "n_test": n,
        "n_positive": int(y.sum()),
        "threshold": threshold,
        "auc": round(auc, 4),
        "sensitivity": round(float(predicted[y == 1].mean()), 4),
        "specificity": round(float((~predicted[y == 0]).mean()), 4),
    }
    if measure_volume:
        numbers["volume_mae_ml"] = round(float(np.mean(errors)), 2) if errors else None
    numbers["seconds"] = round(time.perf_counter() - started, 1)
    return numbers


def evaluate_main(
    argv: list[str] | None,
    *,
    description: str,
    bundle: Path,
    default_n: int,
    evaluate: Callable[[Path, int], dict[str, object]],
) -> int:
    """The command line of a bundle's evaluate.py: print the numbers, ``--write`` stores them.

    ``--write`` writes docs/evaluation.json in the bundle, without the timing.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--bundle", type=Path, default=bundle)
    parser.add_argument("--n", type=int, default=default_n)
    parser.add_argument("--write", action="store_true", help="write docs/evaluation.json")
    args = parser.parse_args(argv)
    numbers = evaluate(args.bundle, args.n)
    print(json.dumps(numbers, indent=2))
    if args.write:
        stored = {k: v for k, v in numbers.items() if k != "seconds"}
        (args.bundle / "docs" / "evaluation.json").write_text(json.dumps(stored, indent=2) + "\n")
    return 0
