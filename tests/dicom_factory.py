"""Small DICOM instances made in memory for tests (no patient data: synthetic values)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_dataset(
    *,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    patient_id: str = "TEST-0001",
    patient_name: str = "Test^Patient",
    modality: str = "CT",
    instance_number: int = 1,
    rows: int = 16,
    columns: int = 16,
    accession_number: str = "ACC0001",
    study_date: str = "20260101",
    study_description: str = "CT HEAD",
    series_description: str = "AXIAL 5mm",
    body_part_examined: str = "HEAD",
    seed: int = 0,
) -> Dataset:
    """A small, valid CT Image Storage instance with native pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = study_date
    ds.StudyTime = "120000"
    ds.AccessionNumber = accession_number
    ds.StudyID = "1"
    ds.StudyDescription = study_description
    ds.ReferringPhysicianName = "Referrer^Test"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = body_part_examined
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number) * 5.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 5.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4000, size=(rows, columns), dtype=np.uint16).tobytes()
    return ds


def part10_bytes(ds: Dataset) -> bytes:
    """`ds` encoded in the DICOM File Format, as a C-STORE SCP would write it."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write(ds: Dataset, path: Path, *, keep_meta: bool = False) -> Path:
    """Write `ds` as a PS3.10 file; `keep_meta` writes its File Meta as given, even
    where it disagrees with the data set (to make broken senders' files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if keep_meta:
        ds.preamble = b"\x00" * 128
        ds.file_meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
        ds.save_as(path, enforce_file_format=False, implicit_vr=False, little_endian=True)
    else:
        ds.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(part10: bytes) -> bytes:
    """The data set of a PS3.10 file without preamble and File Meta Information.

    The meta group is written by whoever writes the file (a C-STORE carries none),
    so comparisons of what was sent with what was stored compare these bytes.
    """
    with io.BytesIO(part10) as fp:
        pydicom.filereader.read_preamble(fp, force=False)
        pydicom.filereader._read_file_meta_info(fp)
        return fp.read()
