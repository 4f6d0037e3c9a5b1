"""The model registry: MONAI bundles found on disk, checked, and run on volumes.

Accepts directories that hold MONAI bundles (one folder per bundle, in the
layout of the MONAI Bundle specification) and produces :class:`InstalledModel`
objects: a model's identity (name, version, SHA-256 of its weights), the
findings it declares, the :class:`~pipeline.selection.SeriesRule` that says
which series it applies to, its mode (active or shadow), and
:meth:`InstalledModel.predict`, which turns a :class:`~pipeline.volume.Volume`
into a :class:`~pipeline.findings.ModelResult`. It never downloads anything
(no ``verify_metadata``, no Model Zoo calls), never reads DICOM and never
touches the archive.

Bundle layout
-------------
::

    <bundle>/
      configs/metadata.json     MONAI metadata: "name", "version", "network_data_format"
      configs/inference.json    MONAI config: "network_def" (for model.pt), optional
                                "preprocessing" (Compose over key "image") and "inferer"
      configs/triage.json       pacs-triage sidecar (below)
      models/model.ts           TorchScript network (preferred when present), or
      models/model.pt           state dict of "network_def"
      docs/README.md            the model card

The triage sidecar ``configs/triage.json`` (a separate file so that a Model Zoo
bundle needs no edit of its own configs to be dropped in)::

    {
      "mode": "active",                         # or "shadow"
      "rule": {"modality": ["CT"], "body_part": ["HEAD", "BRAIN"],
               "body_part_keywords": ["HEAD", "BRAIN"],
               "series_description": null, "exclude_series_description": "SCOUT|LOCALIZER",
               "image_type_includes": [], "min_instances": 16, "max_instances": null},
      "input": {"spatial_size": [64, 64, 64],   # volume resized to this (optional)
                "intensity_window": [-20, 130], # values clipped and scaled to [0, 1] (optional)
                "axes": "zyx"},                 # "zyx": (slices, rows, columns) as in Volume;
                                                # "xyz": (columns, rows, slices), MONAI's LoadImage
      "findings": [
        {"key": "hemorrhage",
         "concept": {"value": "1386000", "scheme_designator": "SCT",
                     "meaning": "Intracranial hemorrhage"},
         "severity": "critical", "threshold": 0.5,
         "output": 0, "index": 0, "activation": "sigmoid",
         "mask": {"output": 1, "index": 0, "activation": "sigmoid", "threshold": 0.5}}
      ]
    }

``output`` picks one of the network's outputs: an integer indexes a tuple or
list output (0 for a single tensor), a string keys a dict output. ``index``
is the column of a (batch, classes) output, or the channel of a
(batch, channels, *spatial) output; for a spatial output the probability is
the maximum over voxels after the activation (``sigmoid``, ``softmax`` over
the channel axis, or ``none``). ``mask`` optionally names a spatial output
whose thresholded channel is the finding's mask; when the finding is present
(probability >= its threshold) the registry derives from it the volume in ml
(3D models only), the centroid in patient coordinates and the key image (the
slice with the largest mask area). Masks are mapped back by scaling, so a
bundle with a mask must keep the field of view (intensity transforms, resize,
padding are fine; cropping or reorientation are not).

Preprocessing comes from ``configs/inference.json``: its ``preprocessing``
transform (loaders such as ``LoadImaged`` removed, since the registry hands over
the volume itself) is applied to ``{"image": array}``; a bundle without one gets
``ScaleIntensityRange`` over ``input.intensity_window`` and ``Resize`` to
``input.spatial_size``. The ``inferer`` of inference.json (e.g.
``SlidingWindowInferer``) runs the network; the default is ``SimpleInferer``.
Inference runs under :func:`torch.inference_mode`.

Shadow mode
-----------
A model in shadow mode is selected and run exactly like an active one, and its
results are recorded (result rows, an SR with its name, version and weights
hash), but they never enter the study's priority in the SR nor the worklist
priority. Two versions of one model can thus be installed side by side, one
active and one in shadow mode, so that a site compares them on its own
studies before switching. Only one version of a model name may be active.

References
----------
MONAI Bundle specification, https://docs.monai.io/en/stable/mb_specification.html
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.sr.coding import Code

from pipeline.findings import (
    FindingDefinition,
    FindingResult,
    ModelIdentity,
    ModelResult,
    SeverityValues,
)
from pipeline.selection import SeriesDescriptor, SeriesRule
from pipeline.volume import Volume

if TYPE_CHECKING:
    import torch

    from archive.config import Settings

logger = logging.getLogger(__name__)

SHIPPED_BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"
"""The bundles that ship with pacs-triage (demonstration models)."""

METADATA_FILE = Path("configs") / "metadata.json"
INFERENCE_FILE = Path("configs") / "inference.json"
TRIAGE_FILE = Path("configs") / "triage.json"
TORCHSCRIPT_FILE = Path("models") / "model.ts"
STATE_DICT_FILE = Path("models") / "model.pt"
MODEL_CARD_FILE = Path("docs") / "README.md"

_LOADER_TRANSFORMS = ("LoadImage", "LoadImaged", "LoadImageD", "LoadImageDict")
_CHANNEL_TRANSFORMS = ("EnsureChannelFirst", "EnsureChannelFirstd", "EnsureChannelFirstD")
_ACTIVATIONS = ("sigmoid", "softmax", "none")


class ModelModeValues(StrEnum):
    """Whether a model's results may change the worklist."""

    ACTIVE = "active"
    """Results enter the SR's priority and the worklist priority."""
    SHADOW = "shadow"
    """Runs and its results are recorded, but they change no priority."""


class BundleValidationError(ValueError):
    """A bundle breaks the layout or its triage section; the message says which rule."""


class ModelError(RuntimeError):
    """An installed model failed while running on a volume."""


class ModelNotFoundError(LookupError):
    """No installed model has the requested name (and version)."""


@dataclass(frozen=True)
class OutputSelector:
    """Which part of a network's output holds a probability or a mask.

    Parameters
    ----------
    output : int | str
        Index into a tuple/list output (0 for a single tensor) or key of a dict output.
    index : int
        Column of a (batch, classes) output or channel of a (batch, channels, *spatial) one.
    activation : str
        ``"sigmoid"``, ``"softmax"`` (over axis 1) or ``"none"``.
    threshold : float
        For masks: voxels whose activated value is >= threshold belong to the mask.
    """

    output: int | str = 0
    index: int = 0
    activation: str = "sigmoid"
    threshold: float = 0.5


@dataclass(frozen=True)
class FindingOutput:
    """How one declared finding is read from the network's output."""

    definition: FindingDefinition
    probability: OutputSelector
    mask: OutputSelector | None = None


@dataclass(frozen=True)
class InputSpec:
    """What the network is fed: channels, spatial shape, intensity window, axis order."""

    channels: int = 1
    spatial_size: tuple[int, ...] | None = None
    """Size the volume is resized to before inference (None: no resize)."""
    patch_size: tuple[int, ...] | None = None
    """Shape of the dummy input used to check the network (metadata spatial_shape)."""
    intensity_window: tuple[float, float] | None = None
    axes: str = "zyx"


class _Runtime:
    """The lazily loaded network, preprocessing and inferer of one model (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loaded: tuple[Any, Any, Any] | None = None


@dataclass(frozen=True)
class InstalledModel:
    """A validated bundle, ready to run.

    Parameters
    ----------
    identity : pipeline.findings.ModelIdentity
        Name and version from metadata.json and the SHA-256 of the weights file.
    findings : tuple[pipeline.findings.FindingDefinition, ...]
        The findings the model declares, in triage.json order.
    rule : pipeline.selection.SeriesRule
        Which series the model applies to.
    mode : ModelModeValues
        Active or shadow (see the module docstring).
    path : pathlib.Path
        The bundle directory.
    """

    identity: ModelIdentity
    findings: tuple[FindingDefinition, ...]
    rule: SeriesRule
    mode: ModelModeValues
    path: Path
    outputs: tuple[FindingOutput, ...] = field(default=(), repr=False)
    input: InputSpec = field(default_factory=InputSpec, repr=False)
    weights_file: Path | None = field(default=None, repr=False)
    device: str = "cpu"
    description: str = ""
    _runtime: _Runtime = field(default_factory=_Runtime, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def version(self) -> str:
        return self.identity.version

    @property
    def is_active(self) -> bool:
        return self.mode is ModelModeValues.ACTIVE

    def applies_to(self, series: SeriesDescriptor) -> bool:
        """Return True if the model's selection rule matches `series`."""
        return self.rule.matches(series)

    # -- running -----------------------------------------------------------------

    def _load(self) -> tuple[Any, Any, Any]:
        """Load network, preprocessing and inferer once; later calls return the cache."""
        loaded = self._runtime.loaded
        if loaded is not None:
            return loaded
        with self._runtime.lock:
            if self._runtime.loaded is None:
                self._runtime.loaded = _load_runtime(self)
            return self._runtime.loaded

    def preprocess(self, volume: Volume) -> torch.Tensor:
        """Apply the bundle's preprocessing to `volume`: a (channels, *spatial) tensor."""
        import torch

        _, preprocessing, _ = self._load()
        try:
            pixels = _model_input(volume.pixels, self.input)
        except ValueError as exc:
            raise ModelError(f"model {self.name} {self.version}: {exc}") from exc
        try:
            image = preprocessing(pixels)
        except Exception as exc:
            raise ModelError(
                f"model {self.name} {self.version}: preprocessing failed: {exc}"
            ) from exc
        image = torch.as_tensor(image, dtype=torch.float32)
        if image.ndim != len(pixels.shape) + 1:
            raise ModelError(
                f"model {self.name} {self.version}: preprocessing gave shape "
                f"{tuple(image.shape)}, expected (channels, *spatial)"
            )
        return image

    def predict(self, volume: Volume) -> ModelResult:
        """Run the model on one volume and return one result per declared finding.

        Parameters
        ----------
        volume : pipeline.volume.Volume
            The series to analyse (values in modality units, e.g. HU for CT).

        Returns
        -------
        pipeline.findings.ModelResult
            One :class:`~pipeline.findings.FindingResult` per declared finding, in
            declaration order; ``volume_ml``, ``location`` and
            ``key_sop_instance_uid`` are set for findings with a mask.

        Raises
        ------
        ModelError
            If loading, preprocessing or the network fails, or the output is not
            what the bundle declares (message names the model and the cause).
        """
        return self.predict_batch([volume])[0]

    def predict_batch(self, volumes: Sequence[Volume]) -> list[ModelResult]:
        """Run the model on several volumes in batches of equal preprocessed shape."""
        started = time.perf_counter()
        images = [self.preprocess(v) for v in volumes]
        raw = self.infer(images)
        results = []
        elapsed = (time.perf_counter() - started) / max(len(volumes), 1)
        for k, volume in enumerate(volumes):
            findings = tuple(self._finding(spec, raw[k], volume) for spec in self.outputs)
            results.append(
                ModelResult(
                    model=self.identity,
                    series_instance_uid=volume.series_instance_uid,
                    findings=findings,
                    inference_seconds=elapsed,
                )
            )
        return results

    def infer(self, images: Sequence[torch.Tensor]) -> list[Any]:
        """Run the network on preprocessed images; return the raw output per batch group.

        Images of equal shape are stacked into one batch; the result is a list
        (one entry per image) of the network's output for that image, with a
        batch axis of length 1.
        """
        import torch

        network, _, inferer = self._load()
        out: list[Any] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, img in enumerate(images):
            groups.setdefault(tuple(img.shape), []).append(k)
        try:
            with torch.inference_mode():
                for indices in groups.values():
                    batch = torch.stack([images[k] for k in indices]).to(self.device)
                    output = inferer(inputs=batch, network=network)
                    for position, k in enumerate(indices):
                        out[k] = _slice_batch(output, position)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(
                f"model {self.name} {self.version}: inference failed: {_summary(exc)}"
            ) from exc
        return out

    def _finding(self, spec: FindingOutput, outputs: Any, volume: Volume) -> FindingResult:
        raw = _select(outputs, spec.probability, self)
        activated = _activate(raw, spec.probability)
        if activated.ndim == 2:
            value = activated[0, spec.probability.index]
        else:
            value = activated[0, spec.probability.index].max()
        probability = float(value)
        if not math.isfinite(probability):
            raise ModelError(
                f"model {self.name} {self.version}: finding {spec.definition.key!r} "
                f"probability is not finite ({probability})"
            )
        probability = min(max(probability, 0.0), 1.0)
        if spec.mask is None or probability < spec.definition.threshold:
            # Measurements describe a present finding only; an absent one has none.
            return FindingResult(definition=spec.definition, probability=probability)
        mask_raw = _select(outputs, spec.mask, self)
        mask = _activate(mask_raw, spec.mask)[0, spec.mask.index] >= spec.mask.threshold
        mask = mask.cpu().numpy()
        if self.input.axes == "xyz":
            mask = mask.T
        volume_ml, location, key_uid = _mask_measurements(mask, volume)
        if mask.ndim == 2:
            volume_ml = None  # a projection image has no volume; location and image stand
        return FindingResult(
            definition=spec.definition,
            probability=probability,
            volume_ml=volume_ml,
            location=location,
            key_sop_instance_uid=key_uid,
        )


def _summary(exc: BaseException) -> str:
    """One line naming an exception (TorchScript errors carry a whole traceback; keep its end)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _slice_batch(output: Any, position: int) -> Any:
    """Keep item `position` of a batched output, with a batch axis of 1 (tensor/tuple/dict)."""
    if isinstance(output, Mapping):
        return {key: _slice_batch(value, position) for key, value in output.items()}
    if isinstance(output, list | tuple):
        return tuple(_slice_batch(value, position) for value in output)
    return output[position : position + 1].detach().float().cpu()


def _select(outputs: Any, selector: OutputSelector, model: InstalledModel) -> torch.Tensor:
    """The output tensor a selector names; ModelError when the network did not give it."""
    import torch

    value = outputs
    if isinstance(value, Mapping):
        if selector.output not in value:
            raise ModelError(
                f"model {model.name} {model.version}: network output has no key "
                f"{selector.output!r} (keys: {sorted(map(str, value))})"
            )
        value = value[selector.output]
    elif isinstance(value, tuple | list):
        if not isinstance(selector.output, int) or not 0 <= selector.output < len(value):
            raise ModelError(
                f"model {model.name} {model.version}: network output has {len(value)} "
                f"parts, declared output {selector.output!r} does not exist"
            )
        value = value[selector.output]
    elif selector.output not in (0, "0"):
        raise ModelError(
            f"model {model.name} {model.version}: network gives one tensor, "
            f"declared output {selector.output!r} does not exist"
        )
    if not isinstance(value, torch.Tensor) or value.ndim < 2:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ModelError(
            f"model {model.name} {model.version}: output {selector.output!r} has shape "
            f"{shape}, expected (batch, classes) or (batch, channels, *spatial)"
        )
    if not 0 <= selector.index < value.shape[1]:
        raise ModelError(
            f"model {model.name} {model.version}: output {selector.output!r} has shape "
            f"{tuple(value.shape)}; declared index {selector.index} is out of range "
            f"(axis 1 has {value.shape[1]} entries)"
        )
    return value


def _activate(value: torch.Tensor, selector: OutputSelector) -> torch.Tensor:
    import torch

    value = value.float()
    if selector.activation == "sigmoid":
        return torch.sigmoid(value)
    if selector.activation == "softmax":
        return torch.softmax(value, dim=1)
    return value


def _mask_measurements(
    mask: np.ndarray, volume: Volume
) -> tuple[float, tuple[float, float, float] | None, str | None]:
    """Volume (ml), centroid (patient mm) and key slice of a mask on the model's grid.

    The mask's grid covers the volume's field of view (resized), so voxel
    indices map back by scaling: index i on a grid of n covers original
    indices ((i + 0.5) * N / n - 0.5).
    """
    if mask.ndim == 2:  # a 2D model's mask on a one-slice volume
        mask = mask[np.newaxis]
    scale = np.asarray(volume.shape, dtype=float) / np.asarray(mask.shape, dtype=float)
    count = int(mask.sum())
    volume_ml = count * float(np.prod(scale)) * volume.voxel_volume_ml
    if count == 0:
        return 0.0, None, None
    centroid = np.argwhere(mask).mean(axis=0)
    k, j, i = (centroid + 0.5) * scale - 0.5
    location = volume.index_to_patient(float(k), float(j), float(i))
    per_slice = mask.reshape(mask.shape[0], -1).sum(axis=1)
    key_slice = int(np.argmax(per_slice))
    original = round(float((key_slice + 0.5) * scale[0] - 0.5))
    original = min(max(original, 0), volume.shape[0] - 1)
    return volume_ml, location, volume.sop_instance_uids[original]


# -- loading -----------------------------------------------------------------------


def _load_runtime(model: InstalledModel) -> tuple[Any, Any, Any]:
    """Load the network (TorchScript or state dict), preprocessing and inferer."""
    try:
        parser = _inference_parser(model.path)
        network = _load_network(model, parser)
        preprocessing = _build_preprocessing(model.path, model.input, parser)
        inferer = _build_inferer(parser)
    except BundleValidationError as exc:
        raise ModelError(str(exc)) from exc
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"model {model.name} {model.version}: cannot load bundle {model.path}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return network, preprocessing, inferer


def _inference_parser(path: Path) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_config(str(path / INFERENCE_FILE))
    except Exception as exc:
        raise BundleValidationError(
            f"{path}: {INFERENCE_FILE} cannot be read: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(parser.config, dict):
        raise BundleValidationError(f"{path}: {INFERENCE_FILE} must hold a JSON object")
    return parser


def _load_network(model: InstalledModel, parser: Any) -> Any:
    import torch

    weights = model.weights_file
    assert weights is not None
    if weights.suffix == ".ts":
        network = torch.jit.load(str(weights), map_location=model.device)
    else:
        if "network_def" not in parser.config:
            raise BundleValidationError(
                f"{model.path}: {STATE_DICT_FILE} needs 'network_def' in {INFERENCE_FILE}"
            )
        network = parser.get_parsed_content("network_def", instantiate=True)
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # MONAI's CheckpointSaver layout
        network.load_state_dict(state)
        network = network.to(model.device)
    network.eval()
    return network


def bundle_preprocessing(path: Path) -> Any:
    """The preprocessing of the bundle at `path`, without loading its network.

    Returns a callable that takes a (slices, rows, columns) array in modality
    units (a :attr:`Volume.pixels <pipeline.volume.Volume.pixels>`) and returns
    the (channels, *spatial) array the network is fed; training scripts use it
    so that the network learns on exactly what inference gives it.
    """
    path = Path(path)
    metadata = _read_json(path, METADATA_FILE)
    _, _, spec, _ = _parse_triage(path, _read_json(path, TRIAGE_FILE), metadata)
    preprocessing = _build_preprocessing(path, spec, _inference_parser(path))

    def apply(pixels: np.ndarray) -> Any:
        return preprocessing(_model_input(pixels, spec))

    return apply


def _model_input(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The volume's array in the axis order and rank the network expects (no channel yet).

    A 2D model (2 spatial axes) takes the one image of a single-image series
    (CR, DX); ``xyz`` reverses the axes to MONAI's LoadImage order.
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    if spec.patch_size is not None and len(spec.patch_size) == 2:
        if pixels.shape[0] != 1:
            raise ValueError(
                f"a 2D model needs a single-image series, got {pixels.shape[0]} images"
            )
        pixels = pixels[0]
    if spec.axes == "xyz":
        pixels = np.ascontiguousarray(pixels.T)
    return pixels


def _build_preprocessing(path: Path, spec: InputSpec, parser: Any) -> Any:
    """A callable numpy array (spatial) -> (channels, *spatial) array or tensor."""
    from monai.transforms import Compose, EnsureChannelFirst, Resize, ScaleIntensityRange

    config = parser.config
    if "preprocessing" in config:
        raw = copy.deepcopy(config["preprocessing"])
        transforms = raw.get("transforms") if isinstance(raw, dict) else None
        if not isinstance(transforms, list):
            raise BundleValidationError(
                f"{path}: {INFERENCE_FILE} 'preprocessing' must be a Compose "
                "with a 'transforms' list"
            )
        kept = []
        adds_channel = False
        for item in transforms:
            target = str(item.get("_target_", "")) if isinstance(item, dict) else ""
            short = target.rsplit(".", 1)[-1]
            if short in _LOADER_TRANSFORMS:
                continue  # the registry hands over the volume itself
            adds_channel = adds_channel or short in _CHANNEL_TRANSFORMS
            kept.append(item)
        raw["transforms"] = kept
        parser["preprocessing"] = raw
        compose = parser.get_parsed_content("preprocessing", instantiate=True)
        key = str(config.get("image_key", "image"))

        def bundle_preprocessing(pixels: np.ndarray) -> Any:
            from monai.data import MetaTensor

            image = pixels if adds_channel else pixels[np.newaxis]
            meta = {"original_channel_dim": "no_channel"} if adds_channel else {}
            data = {key: MetaTensor(image, meta=meta)}
            result = compose(data)
            return result[key] if isinstance(result, dict) else result

        return bundle_preprocessing

    steps: list[Any] = [EnsureChannelFirst(channel_dim="no_channel")]
    if spec.intensity_window is not None:
        low, high = spec.intensity_window
        steps.append(ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    if spec.spatial_size is not None:
        steps.append(Resize(spatial_size=spec.spatial_size, mode="area"))
    compose = Compose(steps)

    def default_preprocessing(pixels: np.ndarray) -> Any:
        from monai.data import MetaTensor

        return compose(MetaTensor(pixels, meta={"original_channel_dim": "no_channel"}))

    return default_preprocessing


def _build_inferer(parser: Any) -> Any:
    from monai.inferers import SimpleInferer

    if "inferer" in parser.config:
        return parser.get_parsed_content("inferer", instantiate=True)
    return SimpleInferer()


# -- validation --------------------------------------------------------------------


def _read_json(path: Path, relative: Path) -> Any:
    file = path / relative
    if not file.is_file():
        raise BundleValidationError(f"{path}: missing {relative}")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleValidationError(f"{path}: {relative} is not valid JSON: {exc}") from exc


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _int_tuple(value: Any, where: str, path: Path) -> tuple[int, ...] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise BundleValidationError(f"{path}: {where} must be a list of positive integers")
    return tuple(value)


def _parse_selector(raw: Mapping[str, Any], where: str, path: Path) -> OutputSelector:
    output = raw.get("output", 0)
    index = raw.get("index", 0)
    activation = raw.get("activation", "sigmoid")
    threshold = raw.get("threshold", 0.5)
    if not isinstance(output, int | str) or isinstance(output, bool):
        raise BundleValidationError(f"{path}: {where}.output must be an integer or a string")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise BundleValidationError(f"{path}: {where}.index must be a non-negative integer")
    if activation not in _ACTIVATIONS:
        raise BundleValidationError(
            f"{path}: {where}.activation must be one of {list(_ACTIVATIONS)}, got {activation!r}"
        )
    if not isinstance(threshold, int | float) or not 0.0 <= float(threshold) <= 1.0:
        raise BundleValidationError(f"{path}: {where}.threshold must lie in [0, 1]")
    return OutputSelector(
        output=output, index=index, activation=activation, threshold=float(threshold)
    )


def _parse_concept(raw: Any, where: str, path: Path) -> Code:
    if not isinstance(raw, Mapping):
        raise BundleValidationError(
            f"{path}: {where}.concept must be an object with value, scheme_designator, meaning"
        )
    missing = [k for k in ("value", "scheme_designator", "meaning") if not raw.get(k)]
    if missing:
        raise BundleValidationError(f"{path}: {where}.concept lacks {', '.join(missing)}")
    return Code(
        str(raw["value"]),
        str(raw["scheme_designator"]),
        str(raw["meaning"]),
        scheme_version=raw.get("scheme_version"),
    )


def _parse_triage(
    path: Path, triage: Any, metadata: Mapping[str, Any]
) -> tuple[SeriesRule, ModelModeValues, InputSpec, tuple[FindingOutput, ...]]:
    """Check the triage sidecar and turn it into rule, mode, input and findings."""
    if not isinstance(triage, Mapping):
        raise BundleValidationError(f"{path}: {TRIAGE_FILE} must hold a JSON object")
    # mode
    try:
        mode = ModelModeValues(triage.get("mode", ModelModeValues.ACTIVE))
    except ValueError:
        raise BundleValidationError(
            f"{path}: {TRIAGE_FILE} mode must be 'active' or 'shadow', got {triage.get('mode')!r}"
        ) from None
    # rule
    raw_rule = triage.get("rule")
    if not isinstance(raw_rule, Mapping):
        raise BundleValidationError(
            f"{path}: {TRIAGE_FILE} has no selection 'rule' (an object with at least 'modality')"
        )
    known = {
        "modality",
        "body_part",
        "body_part_keywords",
        "series_description",
        "exclude_series_description",
        "image_type_includes",
        "min_instances",
        "max_instances",
    }
    unknown = sorted(set(raw_rule) - known)
    if unknown:
        raise BundleValidationError(
            f"{path}: {TRIAGE_FILE} rule has unknown keys {unknown} (known: {sorted(known)})"
        )
    if not raw_rule.get("modality"):
        raise BundleValidationError(f"{path}: {TRIAGE_FILE} rule.modality must name a modality")
    try:
        rule = SeriesRule(**raw_rule)
    except (TypeError, ValueError) as exc:
        raise BundleValidationError(f"{path}: {TRIAGE_FILE} rule is invalid: {exc}") from exc
    # input
    raw_input = triage.get("input", {})
    if not isinstance(raw_input, Mapping):
        raise BundleValidationError(f"{path}: {TRIAGE_FILE} input must be an object")
    image_format = _network_input_format(metadata)
    spatial_size = _int_tuple(raw_input.get("spatial_size"), "triage.json input.spatial_size", path)
    patch = _int_tuple(
        image_format.get("spatial_shape"),
        "metadata.json network_data_format.inputs.image.spatial_shape",
        path,
    )
    channels = raw_input.get("channels", image_format.get("num_channels", 1))
    if not isinstance(channels, int) or channels < 1:
        raise BundleValidationError(f"{path}: input channels must be a positive integer")
    window = raw_input.get("intensity_window")
    if window is not None:
        if (
            not isinstance(window, list)
            or len(window) != 2
            or not all(isinstance(v, int | float) for v in window)
            or not window[0] < window[1]
        ):
            raise BundleValidationError(
                f"{path}: {TRIAGE_FILE} input.intensity_window must be [low, high] with low < high"
            )
        window = (float(window[0]), float(window[1]))
    axes = raw_input.get("axes", "zyx")
    if axes not in ("zyx", "xyz"):
        raise BundleValidationError(f"{path}: {TRIAGE_FILE} input.axes must be 'zyx' or 'xyz'")
    if spatial_size is None and patch is None:
        raise BundleValidationError(
            f"{path}: the input shape is unknown: give input.spatial_size in {TRIAGE_FILE} or "
            f"network_data_format.inputs.image.spatial_shape in {METADATA_FILE}"
        )
    spec = InputSpec(
        channels=channels,
        spatial_size=spatial_size,
        patch_size=patch or spatial_size,
        intensity_window=window,
        axes=axes,
    )
    # findings
    raw_findings = triage.get("findings")
    if not isinstance(raw_findings, list) or not raw_findings:
        raise BundleValidationError(f"{path}: {TRIAGE_FILE} must declare at least one finding")
    outputs = []
    keys: set[str] = set()
    for n, raw in enumerate(raw_findings):
        where = f"{TRIAGE_FILE} findings[{n}]"
        if not isinstance(raw, Mapping):
            raise BundleValidationError(f"{path}: {where} must be an object")
        key = raw.get("key")
        if not isinstance(key, str) or not key:
            raise BundleValidationError(f"{path}: {where}.key must be a non-empty string")
        if key in keys:
            raise BundleValidationError(f"{path}: {where}.key {key!r} is declared twice")
        keys.add(key)
        severity = raw.get("severity")
        if severity not in tuple(SeverityValues):
            raise BundleValidationError(
                f"{path}: {where}.severity must be one of {[s.value for s in SeverityValues]}, "
                f"got {severity!r}"
            )
        try:
            definition = FindingDefinition(
                key=key,
                concept=_parse_concept(raw.get("concept"), where, path),
                severity=severity,
                threshold=float(raw.get("threshold", 0.5)),
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, BundleValidationError):
                raise
            raise BundleValidationError(f"{path}: {where} is invalid: {exc}") from exc
        mask = raw.get("mask")
        if mask is not None and not isinstance(mask, Mapping):
            raise BundleValidationError(f"{path}: {where}.mask must be an object")
        outputs.append(
            FindingOutput(
                definition=definition,
                probability=_parse_selector(raw, where, path),
                mask=_parse_selector(mask, f"{where}.mask", path) if mask else None,
            )
        )
    return rule, mode, spec, tuple(outputs)


def _network_input_format(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    fmt = metadata.get("network_data_format", {})
    inputs = fmt.get("inputs", {}) if isinstance(fmt, Mapping) else {}
    image = inputs.get("image", {}) if isinstance(inputs, Mapping) else {}
    return image if isinstance(image, Mapping) else {}


def _declared_output_channels(metadata: Mapping[str, Any]) -> int | None:
    fmt = metadata.get("network_data_format", {})
    outputs = fmt.get("outputs", {}) if isinstance(fmt, Mapping) else {}
    pred = outputs.get("pred") if isinstance(outputs, Mapping) else None
    if isinstance(pred, Mapping) and isinstance(pred.get("num_channels"), int):
        return int(pred["num_channels"])
    return None


def validate_bundle(
    path: Path, *, device: str = "cpu", check_outputs: bool = True
) -> InstalledModel:
    """Check a bundle and return it as an :class:`InstalledModel`.

    Checks, in order: the MONAI layout (configs/metadata.json with name and
    version, configs/inference.json, models/model.ts or models/model.pt,
    docs/README.md), the triage sidecar (mode, selection rule, input, findings
    with coded concepts and severities), then loads the network and runs it on
    a dummy input of the declared shape (zeros, batch 1) and checks that every
    declared finding's output exists with the declared index, that masks are
    spatial, and that the output channels match
    ``network_data_format.outputs.pred.num_channels`` where metadata gives it.

    Parameters
    ----------
    path : pathlib.Path
        The bundle directory.
    device : str
        Torch device the model will run on (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    check_outputs : bool
        Load the network and run the dummy input (default). Without it only the
        files are checked and the network is loaded on first use.

    Returns
    -------
    InstalledModel
        The validated model; after ``check_outputs`` its network is already loaded.

    Raises
    ------
    BundleValidationError
        With a message that names the bundle, the file and the broken rule.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleValidationError(f"{path}: not a directory")
    metadata = _read_json(path, METADATA_FILE)
    if not isinstance(metadata, Mapping):
        raise BundleValidationError(f"{path}: {METADATA_FILE} must hold a JSON object")
    name, version = metadata.get("name"), metadata.get("version")
    if not isinstance(name, str) or not name.strip():
        raise BundleValidationError(f"{path}: {METADATA_FILE} lacks a 'name'")
    if not isinstance(version, str) or not version.strip():
        raise BundleValidationError(f"{path}: {METADATA_FILE} lacks a 'version'")
    if not (path / INFERENCE_FILE).is_file():
        raise BundleValidationError(f"{path}: missing {INFERENCE_FILE}")
    if not (path / MODEL_CARD_FILE).is_file():
        raise BundleValidationError(f"{path}: missing {MODEL_CARD_FILE} (the model card)")
    weights = next(
        (path / f for f in (TORCHSCRIPT_FILE, STATE_DICT_FILE) if (path / f).is_file()), None
    )
    if weights is None:
        raise BundleValidationError(f"{path}: missing {TORCHSCRIPT_FILE} or {STATE_DICT_FILE}")
    if not (path / TRIAGE_FILE).is_file():
        raise BundleValidationError(
            f"{path}: missing {TRIAGE_FILE} (the triage section: mode, rule, input, findings)"
        )
    triage = _read_json(path, TRIAGE_FILE)
    rule, mode, spec, outputs = _parse_triage(path, triage, metadata)
    parser = _inference_parser(path)
    if weights.suffix == ".pt" and "network_def" not in parser.config:
        raise BundleValidationError(
            f"{path}: {STATE_DICT_FILE} needs 'network_def' in {INFERENCE_FILE}"
        )
    model = InstalledModel(
        identity=ModelIdentity(
            name=name.strip(), version=version.strip(), weights_sha256=_sha256(weights)
        ),
        findings=tuple(o.definition for o in outputs),
        rule=rule,
        mode=mode,
        path=path,
        outputs=outputs,
        input=spec,
        weights_file=weights,
        device=device,
        description=str(metadata.get("description", "")),
    )
    if check_outputs:
        _check_outputs(model, metadata)
    return model


def _check_outputs(model: InstalledModel, metadata: Mapping[str, Any]) -> None:
    """Load the network, run a dummy input of the declared shape, compare with the findings."""
    import torch

    path = model.path
    try:
        model._load()
    except ModelError as exc:
        raise BundleValidationError(f"{path}: the network does not load: {exc}") from exc
    shape = (1, model.input.channels, *(model.input.patch_size or ()))
    dummy = torch.zeros(shape, dtype=torch.float32)
    try:
        raw = model.infer([dummy[0]])[0]
    except ModelError as exc:
        raise BundleValidationError(
            f"{path}: the network fails on a dummy input of shape {shape}: {exc}"
        ) from exc
    spatial_rank = len(shape) - 2
    for spec in model.outputs:
        where = f"finding {spec.definition.key!r}"
        try:
            value = _select(raw, spec.probability, model)
        except ModelError as exc:
            raise BundleValidationError(f"{path}: wrong output shape for {where}: {exc}") from exc
        if value.ndim not in (2, 2 + spatial_rank):
            raise BundleValidationError(
                f"{path}: wrong output shape for {where}: {tuple(value.shape)}, expected "
                f"(1, classes) or (1, channels, {spatial_rank} spatial axes) for input {shape}"
            )
        if spec.mask is not None:
            try:
                mask = _select(raw, spec.mask, model)
            except ModelError as exc:
                raise BundleValidationError(
                    f"{path}: wrong output shape for the mask of {where}: {exc}"
                ) from exc
            if mask.ndim != 2 + spatial_rank:
                raise BundleValidationError(
                    f"{path}: wrong output shape for the mask of {where}: {tuple(mask.shape)}, "
                    f"expected (1, channels, {spatial_rank} spatial axes)"
                )
    declared = _declared_output_channels(metadata)
    first = raw
    if isinstance(first, Mapping):
        first = next(iter(first.values()), None)
    elif isinstance(first, tuple | list):
        first = first[0] if first else None
    if (
        declared is not None
        and isinstance(first, torch.Tensor)
        and first.ndim >= 2
        and first.shape[1] != declared
    ):
        raise BundleValidationError(
            f"{path}: wrong output shape: the network gives {first.shape[1]} channels, "
            f"{METADATA_FILE} network_data_format.outputs.pred.num_channels says {declared}"
        )


# -- the registry ------------------------------------------------------------------


@dataclass(frozen=True)
class BundleProblem:
    """A bundle the registry skipped, and why."""

    path: Path
    message: str


class ModelRegistry:
    """The installed models: every valid bundle found in some directories.

    Use :meth:`discover`; invalid bundles are skipped, logged and kept in
    :attr:`problems` so that ``pacs-triage models list`` can show them.
    """

    def __init__(
        self, models: Sequence[InstalledModel], problems: Sequence[BundleProblem] = ()
    ) -> None:
        self._models = list(models)
        self.problems: list[BundleProblem] = list(problems)

    @classmethod
    def discover(
        cls,
        directories: Sequence[Path],
        *,
        device: str = "cpu",
        check_outputs: bool = True,
    ) -> ModelRegistry:
        """Find and validate every bundle directly under each of `directories`.

        A directory that does not exist is skipped. A sub-folder is a bundle
        candidate when it has a ``configs`` folder. A later bundle with the
        same name and version as an earlier one, or a second active version of
        one name, is refused (listed in :attr:`problems`).
        """
        models: list[InstalledModel] = []
        problems: list[BundleProblem] = []
        seen: set[Path] = set()
        for directory in directories:
            directory = Path(directory)
            if not directory.is_dir():
                logger.debug("models directory %s does not exist; skipped", directory)
                continue
            for candidate in sorted(directory.iterdir()):
                if not candidate.is_dir() or candidate.name.startswith((".", "_")):
                    continue
                if not (candidate / "configs").is_dir():
                    continue
                resolved = candidate.resolve()
                if resolved in seen:
                    continue
                seen.add(resolved)
                try:
                    model = validate_bundle(candidate, device=device, check_outputs=check_outputs)
                except BundleValidationError as exc:
                    logger.warning("model bundle skipped: %s", exc)
                    problems.append(BundleProblem(candidate, str(exc)))
                    continue
                clash = _clash(model, models)
                if clash:
                    logger.warning("model bundle skipped: %s", clash)
                    problems.append(BundleProblem(candidate, clash))
                    continue
                logger.info(
                    "model %s %s (%s) installed from %s, weights sha256 %s",
                    model.name,
                    model.version,
                    model.mode.value,
                    candidate,
                    model.identity.weights_sha256[:12],
                )
                models.append(model)
        return cls(models, problems)

    def models(self) -> list[InstalledModel]:
        """Every installed model, active and shadow, in discovery order."""
        return list(self._models)

    def applicable(self, series: SeriesDescriptor) -> list[InstalledModel]:
        """The models (active and shadow) whose selection rule matches `series`."""
        return [m for m in self._models if m.rule.matches(series)]

    def get(self, name: str, version: str | None = None) -> InstalledModel:
        """Return the model `name` at `version`; without a version, the active one.

        Raises
        ------
        ModelNotFoundError
            If no such model is installed (message lists what is installed).
        """
        same_name = [m for m in self._models if m.name == name]
        if version is not None:
            for model in same_name:
                if model.version == version:
                    return model
        else:
            active = [m for m in same_name if m.is_active]
            if active:
                return active[0]
            if len(same_name) == 1:
                return same_name[0]
        installed = ", ".join(f"{m.name} {m.version}" for m in self._models) or "none"
        wanted = f"{name} {version}" if version else name
        if version is None and same_name:
            raise ModelNotFoundError(
                f"model {name} has no active version; give one of {[m.version for m in same_name]}"
            )
        raise ModelNotFoundError(f"no installed model {wanted} (installed: {installed})")


def _clash(model: InstalledModel, installed: Sequence[InstalledModel]) -> str | None:
    for other in installed:
        if other.name != model.name:
            continue
        if other.version == model.version:
            return (
                f"{model.path}: model {model.name} {model.version} is already installed "
                f"from {other.path}"
            )
        if other.is_active and model.is_active:
            return (
                f"{model.path}: model {model.name} already has an active version "
                f"({other.version} from {other.path}); set this one's mode to 'shadow'"
            )
    return None


def default_model_directories(settings: Settings) -> list[Path]:
    """Where the registry looks for bundles, in order.

    The shipped bundles (``models/bundles``), then each of
    ``settings.models_dirs``, then ``<data_dir>/models``; duplicates removed.
    """
    directories = [SHIPPED_BUNDLES_DIR, *settings.models_dirs, Path(settings.data_dir) / "models"]
    unique: list[Path] = []
    for directory in directories:
        directory = Path(directory).expanduser()
        if directory not in unique:
            unique.append(directory)
    return unique


def configure_inference(settings: Settings) -> str:
    """Apply the node's inference settings to torch and return the device to run models on.

    Sets torch's intra-op CPU threads to ``settings.model_threads`` (0 leaves
    torch's default of one per core). One thread is the default because on a
    small shared machine (2 cores running the DICOM workers, the database and
    the flows) more threads oversubscribe the cores: measured by
    ``benchmarks/inference.py`` on a busy 2-core machine, ich_ct_demo ran 134
    volumes/s with 1 thread and 10 volumes/s with 2. Call once per process,
    before :meth:`ModelRegistry.discover`, and pass the returned device to it.
    """
    import torch

    if settings.model_threads:
        torch.set_num_threads(settings.model_threads)
    return resolve_device(settings.model_device)


def resolve_device(requested: str = "auto") -> str:
    """The torch device for ``"auto"`` (CUDA when available, else CPU) or the one named."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
