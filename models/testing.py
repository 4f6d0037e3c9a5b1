"""Real, tiny MONAI bundles for tests: a model that returns a chosen probability, or fails.

:func:`make_bundle` writes a complete bundle in MONAI's layout (metadata.json,
inference.json with MONAI dictionary transforms, the triage sidecar, a model
card and a real network saved as TorchScript or as a state dict) so that tests
of the registry, the triage flow and the worklist install a model exactly as a
site would. The networks are defined here so that a state-dict bundle's
``network_def`` can name them (``models.testing.ConstantNet``...).

Never used by the product itself; nothing here downloads anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from torch import nn

from pipeline.selection import SeriesRule

BundleKind = Literal["constant", "raises", "intensity"]


def _logit(probability: float) -> float:
    p = min(max(float(probability), 1e-6), 1.0 - 1e-6)
    return math.log(p / (1.0 - p))


class ConstantNet(nn.Module):
    """Gives the same logit for every input: sigmoid(logit) is the chosen probability."""

    def __init__(self, logit: float = 0.0) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.tensor([float(logit)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 0 * mean keeps the output on the input's device and batch size.
        return self.logit.expand(x.shape[0], 1) + 0.0 * x.flatten(1).mean(1, keepdim=True)


class ConstantMaskNet(nn.Module):
    """A constant classification logit plus a mask: voxels whose input exceeds 0.5."""

    def __init__(self, logit: float = 0.0) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.tensor([float(logit)]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logit.expand(x.shape[0], 1) + 0.0 * x.flatten(1).mean(1, keepdim=True)
        return logits, (x[:, :1] - 0.5) * 50.0


class RaisingNet(nn.Module):
    """Passes the registry's dummy-input check (zeros) and fails on any real input."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x != 0).any()):
            raise RuntimeError("synthetic failure: this test model fails on every real input")
        return self.weight.expand(x.shape[0], 1) + 0.0 * x.flatten(1).mean(1, keepdim=True)


class IntensityNet(nn.Module):
    """Probability = mean intensity of the preprocessed input (clamped to (0, 1))."""

    def __init__(self) -> None:
        super().__init__()
        self.eps = nn.Parameter(torch.tensor([1e-4]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.flatten(1).mean(1, keepdim=True)
        return torch.logit(mean.clamp(self.eps, 1.0 - self.eps))


def _rule_dict(rule: SeriesRule | Mapping[str, Any] | None) -> dict[str, Any]:
    if rule is None:
        return {"modality": ["CT"]}
    if isinstance(rule, SeriesRule):
        return {
            f.name: (list(v) if isinstance(v, tuple) else v)
            for f in dataclasses.fields(rule)
            if f.init and (v := getattr(rule, f.name)) not in (None, ())
        }
    return dict(rule)


def make_bundle(
    directory: Path,
    *,
    name: str,
    version: str,
    kind: BundleKind = "constant",
    probability: float = 0.9,
    mode: str = "active",
    rule: SeriesRule | Mapping[str, Any] | None = None,
    finding_key: str = "hemorrhage",
    concept: Code = codes.SCT.IntracranialHemorrhage,
    severity: str = "critical",
    threshold: float = 0.5,
    with_mask: bool = False,
    spatial_size: Sequence[int] = (16, 16, 16),
    intensity_window: Sequence[float] = (0.0, 100.0),
    weights_format: Literal["ts", "pt"] = "ts",
) -> Path:
    """Write a tiny, real MONAI bundle into ``directory/<name>-<version>`` and return its path.

    Parameters
    ----------
    directory : pathlib.Path
        A models directory (created if missing); the bundle becomes a sub-folder.
    name, version : str
        The model's name and version (metadata.json).
    kind : {"constant", "raises", "intensity"}
        ``constant`` returns `probability` for every input; ``raises`` passes
        validation and raises on every real input (a failing model);
        ``intensity`` returns the mean windowed intensity of the input.
    probability : float
        The probability a ``constant`` model returns.
    mode : {"active", "shadow"}
        The model's mode in the triage sidecar.
    rule : SeriesRule | Mapping | None
        Selection rule; default ``{"modality": ["CT"]}`` (every CT series).
    finding_key, concept, severity, threshold
        The one finding the model declares.
    with_mask : bool
        ``constant`` only: also output a mask (voxels above 0.5 after windowing),
        so results carry volume, location and key image.
    spatial_size : sequence of int
        Size volumes are resized to (small keeps tests fast).
    intensity_window : (low, high)
        Values clipped and scaled to [0, 1] by ``ScaleIntensityRanged``.
    weights_format : {"ts", "pt"}
        TorchScript (``models/model.ts``) or a state dict (``models/model.pt``)
        with ``network_def`` in inference.json.

    Returns
    -------
    pathlib.Path
        The bundle directory.
    """
    if kind not in ("constant", "raises", "intensity"):
        raise ValueError(f"kind must be 'constant', 'raises' or 'intensity', got {kind!r}")
    if with_mask and kind != "constant":
        raise ValueError("with_mask is only available for kind='constant'")
    bundle = Path(directory) / f"{name}-{version}"
    for sub in ("configs", "models", "docs"):
        (bundle / sub).mkdir(parents=True, exist_ok=True)

    network_def: dict[str, Any]
    if kind == "constant" and with_mask:
        network: nn.Module = ConstantMaskNet(_logit(probability))
        network_def = {"_target_": "models.testing.ConstantMaskNet", "logit": _logit(probability)}
    elif kind == "constant":
        network = ConstantNet(_logit(probability))
        network_def = {"_target_": "models.testing.ConstantNet", "logit": _logit(probability)}
    elif kind == "raises":
        network = RaisingNet()
        network_def = {"_target_": "models.testing.RaisingNet"}
    else:
        network = IntensityNet()
        network_def = {"_target_": "models.testing.IntensityNet"}
    network.eval()
    if weights_format == "ts":
        torch.jit.script(network).save(str(bundle / "models" / "model.ts"))
    else:
        torch.save(network.state_dict(), bundle / "models" / "model.pt")

    size = [int(s) for s in spatial_size]
    low, high = (float(v) for v in intensity_window)
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "version": version,
        "changelog": {version: "test model written by models.testing.make_bundle"},
        "monai_version": "1.6.1",
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": "2",
        "required_packages_version": {},
        "name": name,
        "task": f"test model ({kind})",
        "description": f"A {kind} test model for pacs-triage tests; not a real model.",
        "authors": "pacs-triage tests",
        "copyright": "Copyright (c) pacs-triage contributors",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": size,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classification",
                    "num_channels": 1,
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": finding_key},
                }
            },
        },
    }
    inference = {
        "image_key": "image",
        "network_def": network_def,
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key"},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "@image_key",
                    "a_min": low,
                    "a_max": high,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "Resized", "keys": "@image_key", "spatial_size": size},
            ],
        },
        "inferer": {"_target_": "SimpleInferer"},
    }
    finding: dict[str, Any] = {
        "key": finding_key,
        "concept": {
            "value": concept.value,
            "scheme_designator": concept.scheme_designator,
            "meaning": concept.meaning,
        },
        "severity": severity,
        "threshold": threshold,
        "output": 0,
        "index": 0,
        "activation": "sigmoid",
    }
    if with_mask:
        finding["mask"] = {"output": 1, "index": 0, "activation": "sigmoid", "threshold": 0.5}
    triage = {
        "mode": mode,
        "rule": _rule_dict(rule),
        "input": {"spatial_size": size, "intensity_window": [low, high], "axes": "zyx"},
        "findings": [finding],
    }
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
    (bundle / "configs" / "triage.json").write_text(json.dumps(triage, indent=2) + "\n")
    (bundle / "docs" / "README.md").write_text(
        f"# {name} {version}\n\nA {kind} test model written by `models.testing.make_bundle`. "
        "Not a real model; for tests only.\n"
    )
    return bundle
