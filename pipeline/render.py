"""Rendering images for people: window/level to 8-bit, thumbnails, PNG/JPEG bytes.

Accepts a 2D array of modality values (a :class:`~pipeline.volume.Volume`
slice) or an image dataset with pixel data, and produces an 8-bit grayscale
(or RGB for color images) numpy array ready to show, smaller copies for
thumbnails, and PNG/JPEG bytes encoded in memory with Pillow. Used by
WADO-RS ``/rendered``, worklist thumbnails and the key image. It never reads
or writes files.

The VOI (value of interest) transform follows PS3.3 C.11.2: an explicit
window wins, then the header's Window Center/Width (its first value, or the
Frame VOI LUT of a multi-frame image), then a VOI LUT Sequence, and with none
of these a window spanning the 0.5th to 99.5th percentile of the values.
MONOCHROME1 images are inverted after the window so that they display as a
MONOCHROME2 viewer would show them.

References
----------
PS3.3 C.11.2 VOI LUT Module and C.7.6.3.1.2 Photometric Interpretation,
https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_C.11.2.html ;
PS3.18 8.3.5.1.3 Rendered media types,
https://dicom.nema.org/medical/dicom/current/output/chtml/part18/sect_8.3.5.html
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from pipeline.volume import PixelDataError, Volume, decode_frames


class VOILUTFunctionValues(StrEnum):
    """Defined terms of VOI LUT Function (0028,1056), PS3.3 C.11.2.1.3."""

    LINEAR = "LINEAR"
    LINEAR_EXACT = "LINEAR_EXACT"
    SIGMOID = "SIGMOID"


class ImageFormatValues(StrEnum):
    """Encodings for rendered images."""

    PNG = "png"
    JPEG = "jpeg"

    @property
    def media_type(self) -> str:
        """The media type that WADO-RS ``/rendered`` answers with."""
        return {"png": "image/png", "jpeg": "image/jpeg"}[self.value]


@dataclass(frozen=True)
class Window:
    """A VOI window: Window Center (0028,1050) and Window Width (0028,1051).

    Raises
    ------
    ValueError
        If `width` is below 1 (LINEAR) or not above 0 (LINEAR_EXACT, SIGMOID),
        PS3.3 C.11.2.1.2 and C.11.2.1.3.
    """

    center: float
    width: float
    function: VOILUTFunctionValues = VOILUTFunctionValues.LINEAR

    def __post_init__(self) -> None:
        object.__setattr__(self, "function", VOILUTFunctionValues(self.function))
        if self.function is VOILUTFunctionValues.LINEAR and not self.width >= 1.0:
            raise ValueError(f"Window.width must be at least 1 for LINEAR, got {self.width}")
        if not self.width > 0.0:
            raise ValueError(f"Window.width must be greater than 0, got {self.width}")


def _functional_group_item(ds: pydicom.Dataset, frame: int, keyword: str) -> pydicom.Dataset | None:
    """First item of functional group `keyword` for `frame` (per-frame, else shared)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame) and per_frame[frame].get(keyword):
        return per_frame[frame].get(keyword)[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and shared[0].get(keyword):
        return shared[0].get(keyword)[0]
    return None


def window_from_dataset(ds: pydicom.Dataset, frame: int = 0) -> Window | None:
    """The first window the header defines for `frame`, or None.

    Parameters
    ----------
    ds : pydicom.Dataset
        An image header.
    frame : int
        0-based frame, for multi-frame images with a Frame VOI LUT per frame.

    References
    ----------
    PS3.3 C.11.2.1.2 Window Center and Window Width,
    https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_C.11.2.html
    """
    source = (
        ds if "WindowCenter" in ds else _functional_group_item(ds, frame, "FrameVOILUTSequence")
    )
    if source is None or "WindowCenter" not in source or "WindowWidth" not in source:
        return None
    center, width = source.WindowCenter, source.WindowWidth
    # Multiple values are alternative windows; the first is the default.
    center = center[0] if isinstance(center, pydicom.multival.MultiValue) else center
    width = width[0] if isinstance(width, pydicom.multival.MultiValue) else width
    function = str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in VOILUTFunctionValues.__members__:
        function = "LINEAR"  # tolerant read of an unknown defined term
    try:
        return Window(float(center), float(width), VOILUTFunctionValues(function))
    except ValueError:
        return None  # an unusable window in the header: fall back to the next rule


def auto_window(values: np.ndarray) -> Window:
    """A window spanning the 0.5th to 99.5th percentile of `values` (robust to outliers)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return Window(0.0, 1.0)
    low, high = np.percentile(finite, [0.5, 99.5])
    return Window(float(low + high) / 2.0, max(float(high - low), 1.0))


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """Map modality values through `window` to uint8 (0-255).

    References
    ----------
    PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT), C.11.2.1.3.1 (SIGMOID),
    https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_C.11.2.html
    """
    x = values.astype(np.float64, copy=False)
    c, w = window.center, window.width
    if window.function is VOILUTFunctionValues.SIGMOID:
        # PS3.3 C.11.2.1.3.1: y = ymax / (1 + exp(-4 (x - c) / w))
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    elif window.function is VOILUTFunctionValues.LINEAR_EXACT:
        # PS3.3 C.11.2.1.3.2: y = (x - c) / w + 0.5, clipped
        y = (x - c) / w + 0.5
    else:
        # PS3.3 C.11.2.1.2.1: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped
        y = (x - (c - 0.5)) / (w - 1.0) + 0.5 if w > 1.0 else (x > c - 0.5).astype(np.float64)
    return np.round(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_frame(
    values: np.ndarray, window: Window | None = None, *, invert: bool = False
) -> np.ndarray:
    """Render a 2D array of modality values to 8-bit grayscale.

    Parameters
    ----------
    values : numpy.ndarray
        (rows, columns) modality values, e.g. ``volume.pixels[k]``.
    window : Window | None
        The VOI window; None picks :func:`auto_window`.
    invert : bool
        Invert after windowing (MONOCHROME1 display).

    Returns
    -------
    numpy.ndarray
        uint8 (rows, columns).
    """
    if values.ndim != 2:
        raise ValueError(f"render_frame needs a 2D array, got shape {values.shape}")
    image = apply_window(values, window or auto_window(values))
    return 255 - image if invert else image


def render_volume_slice(volume: Volume, index: int, window: Window | None = None) -> np.ndarray:
    """Render slice `index` of `volume` (0-based, along the slice normal) to 8-bit."""
    if not 0 <= index < volume.shape[0]:
        raise IndexError(f"slice index {index} outside the volume's {volume.shape[0]} slices")
    return render_frame(volume.pixels[index], window)


def _frame_rescale(ds: pydicom.Dataset, frame: int) -> tuple[float, float] | None:
    """Rescale Slope/Intercept of a multi-frame image's frame (functional groups), if any."""
    item = _functional_group_item(ds, frame, "PixelValueTransformationSequence")
    if item is None:
        return None
    return float(item.get("RescaleSlope", 1.0)), float(item.get("RescaleIntercept", 0.0))


def render_dataset(
    ds: pydicom.Dataset, frame: int = 0, *, window: Window | None = None
) -> np.ndarray:
    """Render one frame of an image dataset for display.

    Applies the Modality LUT, the VOI transform (explicit `window`, else the
    header's, see module docstring) and MONOCHROME1 inversion. Color images
    come back as RGB uint8 (rows, columns, 3), scaled to 8 bits.

    Parameters
    ----------
    ds : pydicom.Dataset
        An image with pixel data, any supported transfer syntax.
    frame : int
        0-based frame number for multi-frame images.
    window : Window | None
        Overrides the header's window.

    Returns
    -------
    numpy.ndarray
        uint8 (rows, columns) grayscale or (rows, columns, 3) RGB.

    Raises
    ------
    PixelDataError
        If the pixel data cannot be decoded or `frame` does not exist.
    """
    stored = decode_frames(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if not 0 <= frame < frames:
        raise PixelDataError(f"frame {frame} does not exist: the image has {frames} frame(s)")
    if frames > 1:
        stored = stored[frame]
    if samples > 1:
        bits = int(ds.get("BitsStored", 8) or 8)
        scale = 255.0 / (2**bits - 1)
        return np.round(stored.astype(np.float64) * scale).astype(np.uint8)

    rescale = _frame_rescale(ds, frame) if frames > 1 else None
    if rescale is not None:
        values = stored.astype(np.float64) * rescale[0] + rescale[1]
    else:
        values = apply_modality_lut(stored, ds)
    invert = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    window = window or window_from_dataset(ds, frame)
    if window is None and "VOILUTSequence" in ds:
        lut = apply_voi_lut(values, ds, index=0).astype(np.float64)
        low, high = float(lut.min()), float(lut.max())
        image = np.round((lut - low) / max(high - low, 1.0) * 255.0).astype(np.uint8)
        return 255 - image if invert else image
    return render_frame(np.asarray(values), window, invert=invert)


def thumbnail(image: np.ndarray, max_size: int = 256) -> np.ndarray:
    """Shrink `image` so that its longer side is at most `max_size` pixels (aspect kept).

    Images already small enough are returned unchanged.
    """
    if max_size < 1:
        raise ValueError(f"max_size must be at least 1, got {max_size}")
    rows, columns = image.shape[:2]
    scale = max_size / max(rows, columns)
    if scale >= 1.0:
        return image
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def encode_image(
    image: np.ndarray,
    image_format: ImageFormatValues | str = ImageFormatValues.PNG,
    quality: int = 90,
) -> bytes:
    """Encode an 8-bit grayscale or RGB array as PNG or JPEG bytes, in memory.

    Raises
    ------
    ValueError
        If `image` is not uint8 (rows, columns) or (rows, columns, 3), or
        `quality` is outside 1-95.
    """
    image_format = ImageFormatValues(str(image_format).lower())
    if (
        image.dtype != np.uint8
        or image.ndim not in (2, 3)
        or (image.ndim == 3 and image.shape[2] != 3)
    ):
        raise ValueError(
            f"encode_image needs uint8 (rows, columns) or (rows, columns, 3), "
            f"got {image.dtype} {image.shape}"
        )
    if not 1 <= quality <= 95:
        raise ValueError(f"quality must lie in 1-95, got {quality}")
    buffer = io.BytesIO()
    picture = Image.fromarray(image)
    if image_format is ImageFormatValues.JPEG:
        picture.save(buffer, format="JPEG", quality=quality)
    else:
        picture.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
