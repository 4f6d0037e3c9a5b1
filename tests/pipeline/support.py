"""Helpers for pipeline/ tests: where the shared real data lies, and synthetic instances."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.peers import SHARED_DATA


def shared_data(*parts: str) -> Path:
    """Path into ../shared/data, or skip the test when that folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the shared test data at {path} (absent in a plain checkout)")
    return path


def make_slice(
    position: Sequence[float],
    *,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixels: np.ndarray | None = None,
    series_instance_uid: str = "1.2.826.0.1.3680043.8.498.1",
    frame_of_reference_uid: str = "1.2.826.0.1.3680043.8.498.2",
    instance_number: int = 1,
    rescale: tuple[float, float] | None = (1.0, -1024.0),
    pixel_spacing: Sequence[float] = (0.5, 0.7),
) -> pydicom.Dataset:
    """A minimal single-frame CT instance at `position` with uint16 pixels."""
    if pixels is None:
        pixels = np.full((4, 6), 1000 + instance_number, dtype=np.uint16)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = "Secret^Patient"
    ds.PatientID = "SECRET-ID"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.SeriesInstanceUID = series_instance_uid
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.Modality = "CT"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = 9.0  # deliberately unlike the spacing of the positions
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds
