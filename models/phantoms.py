"""Synthetic head CT studies: anatomy-like phantoms with and without an intracranial hemorrhage.

Accepts a seed and a few study attributes and produces either arrays (for
training and evaluating the demonstration model) or a CT series written as
DICOM files (for end-to-end tests, demos and cohort runs). The phantom is a
head-shaped ellipsoid: scalp, skull (cortical bone), grey and white matter,
lateral ventricles (CSF), and, randomly, normal calcifications (pineal gland,
choroid plexus) that look hyperdense like blood but are not a finding. A
positive phantom adds one or two hemorrhages: intraparenchymal (a blob of
55-90 HU) or subdural (a crescent along the inner table). Size, position,
orientation, contrast and noise vary with the seed. The same seed always gives
the same pixels and the same UIDs. Nothing here is patient data.

Values are Hounsfield units: air -1000, CSF 0-15, white matter 20-30, grey
matter 35-45, acute blood 50-90, calcification 100-400, bone 700-1800.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

from pipeline.uids import deterministic_uid

RESCALE_INTERCEPT = -1024.0
"""Stored value 0 is -1024 HU (PS3.3 C.11.1.1.2 Modality LUT: HU = stored * slope + intercept)."""


def _instance_header(
    sop_class_uid: str,
    sop_instance_uid: str,
    *,
    patient_name: str,
    patient_id: str,
    study_instance_uid: str,
    study_date: str,
    study_time: str,
    accession_number: str,
    study_description: str,
) -> Dataset:
    """A new instance with its File Meta Information, SOP Common, Patient and General Study.

    References
    ----------
    PS3.10 7.1 File Meta Information; PS3.3 C.12.1 SOP Common, C.7.1.1 Patient,
    C.7.2.1 General Study, https://dicom.nema.org/medical/dicom/current/output/chtml/part03/ps3.3.html
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    # SOP Common (PS3.3 C.12.1)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    # Patient (C.7.1.1)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    # General Study (C.7.2.1)
    ds.StudyInstanceUID = study_instance_uid
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = accession_number
    ds.StudyDescription = study_description
    return ds


def _set_image_pixel(ds: Dataset, pixels: np.ndarray) -> None:
    """Image Pixel module (PS3.3 C.7.6.3) for one frame of 12-bit unsigned MONOCHROME2 values.

    `pixels` is a (rows, columns) array of uint16 holding the stored values.
    """
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()


@dataclass(frozen=True)
class HeadPhantom:
    """One synthetic head CT volume.

    Attributes
    ----------
    hu : numpy.ndarray
        int16 Hounsfield units, shape (slices, rows, columns), slices from feet to head.
    lesion : numpy.ndarray
        bool mask of the hemorrhage (all False for a negative phantom).
    spacing : tuple[float, float, float]
        (slice spacing, row spacing, column spacing) in mm.
    positive : bool
        Whether the phantom has a hemorrhage.
    """

    hu: np.ndarray
    lesion: np.ndarray
    spacing: tuple[float, float, float]
    positive: bool

    @property
    def lesion_ml(self) -> float:
        return float(self.lesion.sum()) * float(np.prod(self.spacing)) / 1000.0


def _blur(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cheap partial-volume smoothing: average with the in-plane neighbours."""
    out = values.copy()
    out[:, 1:, :] += values[:, :-1, :]
    out[:, :-1, :] += values[:, 1:, :]
    out[:, :, 1:] += values[:, :, :-1]
    out[:, :, :-1] += values[:, :, 1:]
    return out / 5.0


def head_phantom(
    seed: int,
    *,
    positive: bool,
    slices: int = 40,
    rows: int = 256,
    columns: int | None = None,
    slice_thickness: float = 4.0,
    field_of_view: float = 240.0,
) -> HeadPhantom:
    """Make one head CT phantom.

    Parameters
    ----------
    seed : int
        Seeds everything random (anatomy, lesion, noise).
    positive : bool
        Add a hemorrhage.
    slices, rows, columns : int
        Array shape; columns default to rows.
    slice_thickness : float
        Distance between slices in mm.
    field_of_view : float
        Width of the square in-plane field of view in mm.
    """
    rng = np.random.default_rng(seed)
    columns = columns or rows
    pixel = field_of_view / rows
    spacing = (float(slice_thickness), float(pixel), float(field_of_view / columns))
    # Patient coordinates (mm) centred on the field of view; z from feet to head.
    z = (np.arange(slices, dtype=np.float32) - (slices - 1) / 2.0) * spacing[0]
    y = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2.0) * spacing[1]
    x = (np.arange(columns, dtype=np.float32) - (columns - 1) / 2.0) * spacing[2]
    zz, yy, xx = z[:, None, None], y[None, :, None], x[None, None, :]

    # Head pose: shift, in-plane rotation, size.
    cx, cy = rng.uniform(-12, 12, size=2)
    cz = rng.uniform(-25, -5) + z[0] * 0.0
    angle = np.deg2rad(rng.uniform(-12, 12))
    ca, sa = np.cos(angle), np.sin(angle)
    u = (xx - cx) * ca + (yy - cy) * sa  # left-right
    v = -(xx - cx) * sa + (yy - cy) * ca  # anterior-posterior
    w = zz - cz
    a, b, c = rng.uniform(68, 78), rng.uniform(86, 98), rng.uniform(78, 90)

    def radius(scale: float, du: float = 0.0, dv: float = 0.0, dw: float = 0.0) -> np.ndarray:
        return (
            ((u - du) / (a * scale)) ** 2
            + ((v - dv) / (b * scale)) ** 2
            + ((w - dw) / (c * scale)) ** 2
        )

    r_head = radius(1.0)
    skull_outer = 0.94
    skull_inner = skull_outer - rng.uniform(0.06, 0.09)
    hu = np.full((slices, rows, columns), -1000.0, dtype=np.float32)
    hu[r_head <= 1.0] = rng.uniform(30, 50)  # scalp
    bone = (r_head <= skull_outer**2) & (r_head > skull_inner**2)
    hu[bone] = rng.uniform(900, 1400)
    brain = r_head <= skull_inner**2
    grey = rng.uniform(35, 44)
    white = grey - rng.uniform(8, 14)
    hu[brain] = grey
    hu[brain & (radius(skull_inner * 0.72) <= 1.0)] = white
    # Lateral ventricles: two small ellipsoids either side of the midline, CSF.
    spread = rng.uniform(8, 14)
    for side in (-1.0, 1.0):
        ventricle = (
            ((u - side * spread) / rng.uniform(6, 10)) ** 2
            + ((v + rng.uniform(-5, 8)) / rng.uniform(22, 32)) ** 2
            + ((w - rng.uniform(5, 20)) / rng.uniform(12, 18)) ** 2
        ) <= 1.0
        hu[ventricle & brain] = rng.uniform(2, 12)
    # Skull base: dense bone under the brain (hyperdense but not blood).
    base = brain & (w < -c * skull_inner * 0.75)
    hu[base] = rng.uniform(500, 900)
    # Normal calcifications (mimics): pineal gland, choroid plexus.
    if rng.random() < 0.6:
        pineal = (u**2 + (v - rng.uniform(10, 20)) ** 2 + (w - rng.uniform(0, 10)) ** 2) <= (
            rng.uniform(2, 4) ** 2
        )
        hu[pineal & brain] = rng.uniform(120, 350)
    if rng.random() < 0.4:
        for side in (-1.0, 1.0):
            plexus = (
                (u - side * spread) ** 2 + (v - rng.uniform(10, 20)) ** 2 + (w - 10) ** 2
            ) <= rng.uniform(2, 3.5) ** 2
            hu[plexus & brain] = rng.uniform(100, 250)

    lesion = np.zeros(hu.shape, dtype=bool)
    if positive:
        for _ in range(1 if rng.random() < 0.8 else 2):
            lesion |= _hemorrhage(rng, u, v, w, radius, skull_inner, brain)
        lesion &= brain
        if not lesion.any():  # a lesion must be visible in a positive phantom
            lesion |= brain & ((u - 0.0) ** 2 + (v - 20.0) ** 2 + (w - 20.0) ** 2 <= 10.0**2)
        hu[lesion] = rng.uniform(55, 90)

    hu = _blur(hu, rng)
    hu += rng.normal(0.0, rng.uniform(3.0, 8.0), size=hu.shape).astype(np.float32)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return HeadPhantom(hu=hu, lesion=lesion, spacing=spacing, positive=positive)


def _hemorrhage(
    rng: np.random.Generator,
    u: np.ndarray,
    v: np.ndarray,
    w: np.ndarray,
    radius: object,
    skull_inner: float,
    brain: np.ndarray,
) -> np.ndarray:
    """One hemorrhage mask: intraparenchymal blob or subdural crescent."""
    if rng.random() < 0.6:
        # Intraparenchymal: an ellipsoid 5-20 mm in radius inside the brain.
        r = rng.uniform(0.0, 0.55)
        theta, phi = rng.uniform(0, 2 * np.pi), rng.uniform(-0.6, 0.9)
        du = r * 65 * np.cos(theta) * np.cos(phi)
        dv = r * 85 * np.sin(theta) * np.cos(phi)
        dw = r * 70 * np.sin(phi) + 10
        sizes = rng.uniform(5, 20, size=3)
        return (
            ((u - du) / sizes[0]) ** 2 + ((v - dv) / sizes[1]) ** 2 + ((w - dw) / sizes[2]) ** 2
        ) <= 1.0
    # Subdural: a crescent between the inner table and a slightly smaller shell,
    # limited to one side and a range of heights.
    thickness = rng.uniform(0.05, 0.12)
    shell = (radius(skull_inner * (1.0 - thickness)) > 1.0) & brain  # type: ignore[operator]
    side = rng.choice([-1.0, 1.0])
    front = rng.uniform(-40, 40)
    sector = (side * u > 10) & (np.abs(v - front) < rng.uniform(30, 60))
    heights = (w > rng.uniform(-30, 10)) & (w < rng.uniform(30, 70))
    return shell & sector & heights


def write_head_ct(
    directory: Path,
    *,
    positive: bool,
    seed: int,
    patient_id: str,
    study_instance_uid: str | None = None,
    slices: int = 40,
    rows: int = 256,
    patient_name: str = "Phantom^Head",
    accession_number: str | None = None,
    study_date: str = "20260101",
    study_time: str = "120000",
    series_description: str = "AXIAL 4mm HEAD",
    series_number: int = 2,
) -> list[Path]:
    """Write a synthetic non-contrast head CT series as CT Image Storage files.

    The series is one axial stack, feet to head, 4 mm slices, 240 mm field of
    view, 12-bit unsigned stored values with Rescale Intercept -1024 (HU),
    Body Part Examined HEAD, Study Description "CT HEAD". UIDs derive from
    `seed` and `patient_id` (deterministic) unless `study_instance_uid` is given.

    Parameters
    ----------
    directory : pathlib.Path
        Where to write the files (created if missing); one file per slice,
        named ``CT<instance number>.dcm``.
    positive : bool
        Whether the phantom has an intracranial hemorrhage.
    seed : int
        Seeds the phantom and the UIDs.
    patient_id : str
        Patient ID (0010,0020).
    study_instance_uid : str | None
        Study Instance UID; default derived from seed and patient_id.
    slices, rows : int
        Number of slices and the (square) matrix size.

    Returns
    -------
    list[pathlib.Path]
        The files written, in slice order.

    References
    ----------
    PS3.3 A.3 CT Image IOD, https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_A.3.html
    """
    phantom = head_phantom(seed, positive=positive, slices=slices, rows=rows)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or deterministic_uid("phantom-study", patient_id, seed)
    series_uid = deterministic_uid("phantom-series", study_uid, seed, series_number)
    frame_uid = deterministic_uid("phantom-frame", study_uid, seed)
    accession = accession_number or f"PH{seed % 10**8:08d}"
    stored = (phantom.hu.astype(np.int32) - int(RESCALE_INTERCEPT)).astype(np.uint16)
    z0 = -(slices - 1) / 2.0 * phantom.spacing[0]
    x0 = -(rows - 1) / 2.0 * phantom.spacing[2]
    y0 = -(rows - 1) / 2.0 * phantom.spacing[1]
    paths = []
    for k in range(slices):
        sop_uid = deterministic_uid("phantom-instance", series_uid, k)
        ds = _instance_header(
            CTImageStorage,
            sop_uid,
            patient_name=patient_name,
            patient_id=patient_id,
            study_instance_uid=study_uid,
            study_date=study_date,
            study_time=study_time,
            accession_number=accession,
            study_description="CT HEAD",
        )
        # General Series (C.7.3.1)
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.BodyPartExamined = "HEAD"
        ds.PatientPosition = "HFS"
        # Frame of Reference (C.7.4.1), General Equipment (C.7.5.1)
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "pacs-triage synthetic phantom"
        # General Image (C.7.6.1), Image Plane (C.7.6.2)
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ContentDate = study_date
        ds.ContentTime = study_time
        ds.PixelSpacing = [round(phantom.spacing[1], 6), round(phantom.spacing[2], 6)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z_k = round(z0 + k * phantom.spacing[0], 4)
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), z_k]
        ds.SliceThickness = phantom.spacing[0]
        ds.SliceLocation = z_k
        _set_image_pixel(ds, stored[k])
        # CT Image (C.8.2.1)
        ds.RescaleIntercept = RESCALE_INTERCEPT
        ds.RescaleSlope = 1.0
        ds.RescaleType = "HU"
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 80
        path = directory / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def phantom_batch(
    seeds: Sequence[int], positives: Sequence[bool], **kwargs: object
) -> list[HeadPhantom]:
    """Several phantoms at once (for training and evaluation)."""
    return [head_phantom(s, positive=p, **kwargs) for s, p in zip(seeds, positives, strict=True)]  # type: ignore[arg-type]


@dataclass(frozen=True)
class ChestPhantom:
    """One synthetic PA chest radiograph (values: 12-bit, brighter = more attenuation).

    Attributes
    ----------
    pixels : numpy.ndarray
        uint16 array (rows, columns), MONOCHROME2.
    lesion : numpy.ndarray
        bool mask of the pneumothorax (all False for a negative phantom).
    spacing : float
        Pixel spacing in mm (square pixels).
    positive : bool
        Whether the phantom has a pneumothorax.
    """

    pixels: np.ndarray
    lesion: np.ndarray
    spacing: float
    positive: bool


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: int) -> np.ndarray:
    """Smooth random texture: coarse noise upsampled by repetition and box-blurred."""
    coarse = rng.normal(0.0, 1.0, size=(shape[0] // scale + 2, shape[1] // scale + 2))
    fine = np.kron(coarse, np.ones((scale, scale)))[: shape[0], : shape[1]]
    for axis in (0, 1):
        fine = (np.roll(fine, scale // 2, axis) + fine + np.roll(fine, -(scale // 2), axis)) / 3.0
    return fine


def chest_radiograph(seed: int, *, positive: bool, rows: int = 512) -> ChestPhantom:
    """Make one PA chest radiograph phantom, with or without a pneumothorax.

    The thorax is a bright soft-tissue silhouette; the lungs are two dark
    ellipses with vessel-like markings that fade towards the periphery; the
    mediastinum and heart are bright between them, the diaphragm below, ribs
    are faint curved bands. A pneumothorax is a peripheral region of one lung
    (apex or lateral) without lung markings, darker than lung, bounded by a
    thin bright visceral pleural line. Size, side, position, contrast and
    noise vary with the seed.
    """
    rng = np.random.default_rng(seed)
    spacing = 400.0 / rows
    y, x = np.mgrid[0:rows, 0:rows].astype(np.float32)
    y = (y - rows / 2) * spacing  # mm, head (negative) to feet (positive)
    x = (x - rows / 2) * spacing  # mm, patient right (negative) to left
    cx, cy = rng.uniform(-10, 10), rng.uniform(-10, 10)
    image = np.full((rows, rows), rng.uniform(80, 200), dtype=np.float32)  # air
    body = ((x - cx) / rng.uniform(160, 185)) ** 2 + ((y - cy) / rng.uniform(210, 240)) ** 2 <= 1
    image[body] = rng.uniform(1900, 2300)
    lung_value = rng.uniform(700, 1000)
    markings = 120.0 * _smooth_noise(rng, (rows, rows), max(rows // 64, 2))
    lesion = np.zeros((rows, rows), dtype=bool)
    lungs = np.zeros((rows, rows), dtype=bool)
    for side in (-1.0, 1.0):
        lx = cx + side * rng.uniform(65, 80)
        ly = cy - rng.uniform(5, 25)
        ax, ay = rng.uniform(50, 65), rng.uniform(105, 130)
        r = ((x - lx) / ax) ** 2 + ((y - ly) / ay) ** 2
        lung = r <= 1.0
        lungs |= lung
        # Markings fade towards the periphery (r -> 1), as vessels taper.
        image[lung] = lung_value + (markings[lung] * (1.2 - r[lung]))
        if positive and (side == 1.0) == (rng.random() < 0.5) and not lesion.any():
            # Pneumothorax: the periphery of this lung beyond a shrunken contour.
            shrink = rng.uniform(0.55, 0.85)
            inner = ((x - lx - side * rng.uniform(0, 12)) / (ax * shrink)) ** 2 + (
                (y - ly - rng.uniform(0, 25)) / (ay * shrink)
            ) ** 2 <= 1.0
            region = lung & ~inner
            upper = y < ly + rng.uniform(-20, 60)
            region &= upper
            lesion |= region
            image[region] = lung_value - rng.uniform(80, 200)
            # Visceral pleural line: the border of the collapsed lung.
            edge = region & ~np.roll(region, 2, axis=1) | region & ~np.roll(region, -2, axis=1)
            image[edge & inner.__invert__()] += rng.uniform(100, 250)
    if positive and not lesion.any():  # the coin above chose neither side: use the left
        lesion |= lungs & (x > cx + 90) & (y < cy - 20)
        image[lesion] = lung_value - 150.0
    mediastinum = (np.abs(x - cx - 10) < rng.uniform(35, 50) + np.clip(y - cy, 0, None) * 0.5) & (
        y > cy - 140
    )
    image[mediastinum & body & ~lesion] = rng.uniform(2100, 2500)
    diaphragm = (y > cy + rng.uniform(90, 110) + 0.002 * (x - cx) ** 2) & body
    image[diaphragm] = rng.uniform(2200, 2500)
    ribs = (np.sin((y - 0.0015 * (x - cx) ** 2) / rng.uniform(9, 12)) > 0.7) & lungs
    image[ribs] += rng.uniform(150, 300)
    image += rng.normal(0, rng.uniform(15, 40), size=image.shape)
    pixels = np.clip(np.rint(image), 0, 4095).astype(np.uint16)
    return ChestPhantom(pixels=pixels, lesion=lesion & lungs, spacing=spacing, positive=positive)


def write_chest_dx(
    directory: Path,
    *,
    positive: bool,
    seed: int,
    patient_id: str,
    study_instance_uid: str | None = None,
    rows: int = 512,
    patient_name: str = "Phantom^Chest",
    accession_number: str | None = None,
    study_date: str = "20260101",
    study_time: str = "120000",
) -> list[Path]:
    """Write a synthetic PA chest radiograph as one DX Image Storage (For Presentation) file.

    Body Part Examined CHEST, View Position PA, Study Description "XR CHEST PA",
    12-bit MONOCHROME2. UIDs derive from `seed` and `patient_id` unless
    `study_instance_uid` is given.

    Returns
    -------
    list[pathlib.Path]
        The one file written.

    References
    ----------
    PS3.3 A.26 Digital X-Ray Image IOD,
    https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_A.26.html
    """
    from pydicom.uid import DigitalXRayImageStorageForPresentation

    phantom = chest_radiograph(seed, positive=positive, rows=rows)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or deterministic_uid("phantom-dx-study", patient_id, seed)
    series_uid = deterministic_uid("phantom-dx-series", study_uid, seed)
    sop_uid = deterministic_uid("phantom-dx-instance", series_uid)
    ds = _instance_header(
        DigitalXRayImageStorageForPresentation,
        sop_uid,
        patient_name=patient_name,
        patient_id=patient_id,
        study_instance_uid=study_uid,
        study_date=study_date,
        study_time=study_time,
        accession_number=accession_number or f"PX{seed % 10**8:08d}",
        study_description="XR CHEST PA",
    )
    ds.Modality = "DX"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = "CHEST PA"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "pacs-triage synthetic phantom"
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.ContentDate = study_date
    ds.ContentTime = study_time
    ds.AcquisitionDate = study_date
    ds.AcquisitionTime = study_time
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined = "CHEST"
    ds.ImageLaterality = "U"
    ds.ViewPosition = "PA"
    ds.PositionerType = ""
    ds.AcquisitionContextSequence = []
    region = Dataset()  # PS3.16 CID 4031: (51185008, SCT, "Chest")
    region.CodeValue = "51185008"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Chest"
    ds.AnatomicRegionSequence = [region]
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.ImagerPixelSpacing = [round(phantom.spacing, 6)] * 2
    ds.PixelSpacing = [round(phantom.spacing, 6)] * 2
    ds.DetectorType = "DIRECT"
    ds.WindowCenter = 1500
    ds.WindowWidth = 3000
    _set_image_pixel(ds, phantom.pixels)
    path = directory / "DX0001.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [path]
