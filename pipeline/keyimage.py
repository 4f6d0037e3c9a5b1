"""The key image as a DICOM Secondary Capture, with the finding marked on it.

Accepts the header of the image where a finding is best seen, that image's
modality values (a :class:`~pipeline.volume.Volume` slice), the
:class:`~pipeline.findings.FindingResult` and the model, optionally a point
or a 2D mask, and produces a highdicom ``SCImage``: the image windowed to
8 bits, enlarged to at least 512 pixels, the finding outlined (mask contour
and bounding box) or circled (point), and burned-in text naming the finding,
its probability, the model and "AI result - not for diagnostic use". It lies
in the source study, in a series of its own, with UIDs derived from study,
model, finding and generation, so building it twice gives the same instance.
Nothing here reads or writes files.

Why Secondary Capture rather than a Key Object Selection document: every
viewer displays an SC image, including those that cannot show TID 1500 or
KOS, and the mark and the warning travel inside the pixels.

References
----------
PS3.3 A.8.1 Secondary Capture Image IOD,
https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_A.8.html ;
PS3.3 C.7.6.1.1.3 Derivation Description and Source Image Sequence,
https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_C.7.6.html
"""

from __future__ import annotations

import numpy as np
import pydicom
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont

from pipeline.findings import FindingResult, ModelIdentity
from pipeline.render import Window, render_frame, window_from_dataset
from pipeline.uids import deterministic_uid, validate_uid
from pipeline.volume import Volume

KEY_IMAGE_SERIES_NUMBER = 9902
KEY_IMAGE_SERIES_DESCRIPTION = "AI key images - not for diagnostic use"
DISCLAIMER = "AI result - not for diagnostic use"
MANUFACTURER = "pacs-triage"
MIN_SIZE = 512
"""Images smaller than this (longer side) are enlarged so the text stays legible."""
MARK_COLOR = (255, 215, 0)
"""Gold: visible on any gray level."""


def patient_to_index(
    volume: Volume, point: tuple[float, float, float]
) -> tuple[float, float, float]:
    """Map a patient coordinate (LPS, mm) to a continuous (slice, row, column) index.

    The inverse of :meth:`Volume.index_to_patient`.

    References
    ----------
    PS3.3 C.7.6.2.1.1, https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_C.7.6.2.html
    """
    row_cos = np.asarray(volume.orientation[:3], dtype=float)
    col_cos = np.asarray(volume.orientation[3:], dtype=float)
    normal = np.cross(row_cos, col_cos)
    # Columns of `axes` are the patient-space steps of one slice, row and column.
    axes = np.column_stack(
        (normal * volume.spacing[0], col_cos * volume.spacing[1], row_cos * volume.spacing[2])
    )
    offset = np.asarray(point, dtype=float) - np.asarray(volume.origin, dtype=float)
    k, j, i = np.linalg.solve(axes, offset)
    return float(k), float(j), float(i)


def key_image_position(
    volume: Volume, finding: FindingResult
) -> tuple[int, tuple[float, float] | None]:
    """Where to show `finding` in `volume`: (slice index, (row, column) or None).

    The location (patient mm) gives slice and point; without one, the key
    image UID gives the slice only.

    Raises
    ------
    ValueError
        If the finding has neither location nor key image, or they lie outside
        the volume.
    """
    if finding.location is not None:
        k, j, i = patient_to_index(volume, finding.location)
        index = round(k)
        if not (
            0 <= index < volume.shape[0] and 0 <= j < volume.shape[1] and 0 <= i < volume.shape[2]
        ):
            raise ValueError(
                f"finding {finding.definition.key!r}: location {finding.location} lies "
                "outside the volume"
            )
        return index, (j, i)
    if finding.key_sop_instance_uid is not None:
        if finding.key_sop_instance_uid not in volume.sop_instance_uids:
            raise ValueError(
                f"finding {finding.definition.key!r}: key image {finding.key_sop_instance_uid} "
                "is not a slice of the volume"
            )
        return volume.sop_instance_uids.index(finding.key_sop_instance_uid), None
    raise ValueError(f"finding {finding.definition.key!r} has neither a location nor a key image")


def key_image_uids(
    study_instance_uid: str,
    model: ModelIdentity,
    finding_key: str,
    source_sop_instance_uid: str,
    generation: int = 1,
) -> tuple[str, str]:
    """Return (Series Instance UID, SOP Instance UID) of the key image for these inputs."""
    study_instance_uid = validate_uid(study_instance_uid, "StudyInstanceUID")
    series = deterministic_uid(study_instance_uid, "key image series")
    instance = deterministic_uid(
        study_instance_uid,
        "key image",
        model.name,
        model.version,
        finding_key,
        source_sop_instance_uid,
        generation,
    )
    return series, instance


def _contour(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a 2D boolean mask (4-neighbourhood)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = (
        padded[1:-1, 1:-1]
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )
    return mask & ~interior


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _patient_orientation(ds: pydicom.Dataset) -> tuple[str, str] | None:
    """Patient Orientation letters of the rows and columns (dominant axis), PS3.3 C.7.6.1.1.1."""
    cosines = ds.get("ImageOrientationPatient")
    if cosines is not None and len(cosines) == 6:
        letters = []
        for vector in (cosines[:3], cosines[3:]):
            axis = int(np.argmax(np.abs(np.asarray(vector, dtype=float))))
            positive = float(vector[axis]) > 0
            letters.append(("L", "P", "H")[axis] if positive else ("R", "A", "F")[axis])
        return letters[0], letters[1]
    orientation = ds.get("PatientOrientation")
    if orientation is not None and len(orientation) == 2:
        first, second = str(orientation[0])[:1], str(orientation[1])[:1]
        if first in "LRAPHF" and second in "LRAPHF" and first and second:
            return first, second
    return None


def build_key_image(
    source_image: pydicom.Dataset,
    frame: np.ndarray,
    finding: FindingResult,
    model: ModelIdentity,
    *,
    point: tuple[float, float] | None = None,
    mask: np.ndarray | None = None,
    window: Window | None = None,
    generation: int = 1,
    instance_number: int = 1,
) -> SCImage:
    """Build the Secondary Capture of a key image with the finding marked.

    Parameters
    ----------
    source_image : pydicom.Dataset
        Header of the image shown (patient, study, SOP Instance UID, window).
    frame : numpy.ndarray
        Its modality values, (rows, columns), e.g. ``volume.pixels[k]``.
    finding : FindingResult
        The finding to mark and name.
    model : ModelIdentity
        The model that found it.
    point : tuple[float, float] | None
        (row, column) to circle, e.g. from :func:`key_image_position`.
    mask : numpy.ndarray | None
        2D boolean mask of the finding in this image; its contour and
        bounding box are drawn.
    window : Window | None
        VOI window; default the header's, else automatic.
    generation : int
        Analysis generation (part of the SOP Instance UID).
    instance_number : int
        Instance Number within the key image series.

    Returns
    -------
    highdicom.sc.SCImage
        RGB, 8 bits, Burned In Annotation YES, Source Image Sequence naming
        `source_image`.

    Raises
    ------
    ValueError
        If `frame` is not 2D, `mask` has another shape, or UIDs are invalid.
    """
    if frame.ndim != 2:
        raise ValueError(f"frame must be 2D (rows, columns), got shape {frame.shape}")
    if mask is not None and mask.shape != frame.shape:
        raise ValueError(f"mask shape {mask.shape} differs from frame shape {frame.shape}")
    study_instance_uid = validate_uid(source_image.get("StudyInstanceUID"), "StudyInstanceUID")
    source_uid = validate_uid(source_image.get("SOPInstanceUID"), "SOPInstanceUID")
    source_class = validate_uid(source_image.get("SOPClassUID"), "SOPClassUID")

    gray = render_frame(
        frame,
        window or window_from_dataset(source_image),
        invert=str(source_image.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1",
    )
    scale = max(1, -(-MIN_SIZE // max(gray.shape)))  # integer zoom, ceil
    picture = Image.fromarray(gray).convert("RGB")
    if scale > 1:
        picture = picture.resize(
            (gray.shape[1] * scale, gray.shape[0] * scale), Image.Resampling.NEAREST
        )
    draw = ImageDraw.Draw(picture)
    line = max(2, picture.width // 256)
    if mask is not None and mask.any():
        rows, columns = np.nonzero(_contour(mask.astype(bool)))
        for r, c in zip(rows, columns, strict=True):
            draw.rectangle(
                (c * scale, r * scale, (c + 1) * scale - 1, (r + 1) * scale - 1), fill=MARK_COLOR
            )
        rows, columns = np.nonzero(mask)
        margin = 3 * line
        draw.rectangle(
            (
                columns.min() * scale - margin,
                rows.min() * scale - margin,
                (columns.max() + 1) * scale + margin,
                (rows.max() + 1) * scale + margin,
            ),
            outline=MARK_COLOR,
            width=line,
        )
    if point is not None:
        y, x = (point[0] + 0.5) * scale, (point[1] + 0.5) * scale
        radius = picture.width // 20
        draw.ellipse(
            (x - radius, y - radius, x + radius, y + radius), outline=MARK_COLOR, width=line
        )

    size = max(14, picture.width // 32)
    font = _font(size)
    text = [
        f"{finding.definition.concept.meaning}: p={finding.probability:.2f}",
        f"{model.name} {model.version}",
        DISCLAIMER,
    ]
    y = size // 2
    for entry in text:
        # Dark outline keeps the text legible on bright anatomy.
        draw.text(
            (size // 2, y), entry, fill=MARK_COLOR, font=font, stroke_width=2, stroke_fill=(0, 0, 0)
        )
        y += int(size * 1.3)

    pixels = np.asarray(picture, dtype=np.uint8)
    series_uid, sop_uid = key_image_uids(
        study_instance_uid, model, finding.definition.key, source_uid, generation
    )
    spacing = source_image.get("PixelSpacing")
    orientation = _patient_orientation(source_image)
    sc = SCImage.from_ref_dataset(
        ref_dataset=source_image,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=KEY_IMAGE_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        pixel_spacing=(float(spacing[0]) / scale, float(spacing[1]) / scale) if spacing else None,
        patient_orientation=orientation or ("L", "P"),
        series_description=KEY_IMAGE_SERIES_DESCRIPTION,
    )
    if orientation is None:
        sc.PatientOrientation = None  # Type 2C: known to be unknown, left empty
    # PS3.3 C.8.6.1: the image was made by software on a workstation.
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    if "Laterality" not in sc:
        # PS3.3 C.7.3.1 Type 2C; dciodvfy requires it when Image Laterality is absent.
        sc.Laterality = source_image.get("Laterality") or None
    sc.ImageComments = DISCLAIMER
    sc.DerivationDescription = (
        f"Key image of AI finding {finding.definition.key} marked by pacs-triage"
    )[:1024]
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = source_class
    reference.ReferencedSOPInstanceUID = source_uid
    sc.SourceImageSequence = [reference]
    return sc
