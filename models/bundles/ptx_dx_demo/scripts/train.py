"""Train the ptx_dx_demo network on synthetic chest radiograph phantoms (CPU, deterministic).

Usage (from the repository root)::

    python models/bundles/ptx_dx_demo/scripts/train.py            # full: writes the bundle
    python models/bundles/ptx_dx_demo/scripts/train.py --quick --output /tmp/ich  # smoke run

The full run generates the training and validation phantoms, trains the 3D
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
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_roc_auc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BUNDLE,
    TRAIN_SEEDS,
    VALIDATION_SEEDS,
    make_samples,
)

FULL = {"train": 600, "validation": 100, "epochs": 12, "batch": 16, "lr": 1e-2}
QUICK = {"train": 32, "validation": 16, "epochs": 1, "batch": 16, "lr": 1e-2}


def build_network(bundle: Path) -> torch.nn.Module:
    """The network of the bundle's inference.json (``network_def``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    return parser.get_parsed_content("network_def", instantiate=True)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pixel BCE (pneumothorax pixels weighted 5: they are about 3 % of the image) + soft Dice."""
    voxel = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets, pos_weight=torch.tensor(5.0)
    )
    probs = torch.sigmoid(logits)
    intersection = (probs * targets).sum()
    dice = 1.0 - (2.0 * intersection + 1.0) / (probs.sum() + targets.sum() + 1.0)
    return voxel + dice


def study_probabilities(network: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    network.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), 8):
            logits = network(torch.from_numpy(images[start : start + 8]))
            out.append(torch.sigmoid(logits.flatten(1).max(dim=1).values).numpy())
    return np.concatenate(out)


def youden_threshold(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1; ties go nearest 0.5.

    The image probability is a maximum over pixels and saturates near 1, so the
    grid runs to 0.999.
    """
    best, best_j = 0.5, -1.0
    grid = [*np.round(np.linspace(0.05, 0.99, 95), 2), 0.995, 0.998, 0.999]
    for t in sorted(grid, key=lambda v: abs(v - 0.5)):
        predicted = probabilities >= t
        sensitivity = predicted[labels == 1].mean()
        specificity = (~predicted[labels == 0]).mean()
        j = sensitivity + specificity - 1.0
        if j > best_j + 1e-9:
            best, best_j = float(t), float(j)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few phantoms, one epoch")
    parser.add_argument("--output", type=Path, default=None, help="bundle folder to write")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    output = args.output or BUNDLE
    if args.quick and output.resolve() == BUNDLE:
        parser.error("--quick needs --output elsewhere than the committed bundle")
    if output.resolve() != BUNDLE:
        shutil.copytree(
            BUNDLE, output, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
        )

    torch.set_num_threads(1)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    train = make_samples(list(TRAIN_SEEDS)[: config["train"]], varied=True)
    validation = make_samples(list(VALIDATION_SEEDS)[: config["validation"]], varied=False)
    print(
        f"data: {len(train.labels)} train, {len(validation.labels)} validation phantoms "
        f"in {time.perf_counter() - started:.0f} s",
        flush=True,
    )

    network = build_network(output)
    optimizer = torch.optim.Adam(network.parameters(), lr=config["lr"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config["epochs"])
    generator = np.random.default_rng(0)
    for epoch in range(config["epochs"]):
        network.train()
        order = generator.permutation(len(train.labels))
        total = 0.0
        for start in range(0, len(order), config["batch"]):
            index = order[start : start + config["batch"]]
            images = torch.from_numpy(train.images[index])
            targets = torch.from_numpy(train.targets[index])
            if generator.random() < 0.5:  # left-right flip (columns)
                images, targets = images.flip(-1), targets.flip(-1)
            optimizer.zero_grad()
            loss = loss_fn(network(images), targets)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        scheduler.step()
        val = study_probabilities(network, validation.images)
        val_auc = float(compute_roc_auc(torch.from_numpy(val), torch.from_numpy(validation.labels)))
        print(
            f"epoch {epoch + 1}/{config['epochs']}: loss {total / len(order):.4f}, "
            f"validation AUC {val_auc:.3f}, "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )

    threshold = youden_threshold(study_probabilities(network, validation.images), validation.labels)
    network.eval()
    torch.save(network.state_dict(), output / "models" / "model.pt")
    triage_file = output / "configs" / "triage.json"
    triage = json.loads(triage_file.read_text())
    triage["findings"][0]["threshold"] = threshold
    triage_file.write_text(json.dumps(triage, indent=2) + "\n")
    training = {
        "train_phantoms": config["train"],
        "validation_phantoms": config["validation"],
        "epochs": config["epochs"],
        "seconds": round(time.perf_counter() - started, 1),
        "threshold": threshold,
        "threads": 1,
    }
    (output / "docs" / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    print(f"weights written to {output / 'models' / 'model.pt'}; threshold {threshold}", flush=True)
    evaluate = Path(__file__).resolve().parent / "evaluate.py"
    extra = ["--n", "16"] if args.quick else []
    return subprocess.call(
        [sys.executable, str(evaluate), "--bundle", str(output), "--write", *extra]
    )


if __name__ == "__main__":
    sys.exit(main())
