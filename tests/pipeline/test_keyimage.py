"""Tests for pipeline/keyimage.py: the Secondary Capture key image."""

from __future__ import annotations

import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.coding import Code

from pipeline.findings import FindingDefinition, FindingResult, ModelIdentity, SeverityValues
from pipeline.keyimage import (
    DISCLAIMER,
    MARK_COLOR,
    build_key_image,
    key_image_position,
    key_image_uids,
    patient_to_index,
)
from pipeline.volume import volume_from_datasets

MASS = FindingDefinition("mass", Code("4147007", "SCT", "Mass"), SeverityValues.URGENT, 0.5)
MODEL = ModelIdentity("demo-net", "1.2.0", "ab" * 32)

pytestmark = pytest.mark.filterwarnings(
    "ignore:The string .* is unlikely to represent the intended person name:UserWarning"
)


@pytest.fixture(scope="module")
def ct_volume(ct_series):
    return volume_from_datasets(ct_series)


class TestKeyImagePosition:
    def test_patient_to_index_inverts_index_to_patient(self, ct_volume):
        point = ct_volume.index_to_patient(60, 260, 300)
        assert patient_to_index(ct_volume, point) == pytest.approx((60, 260, 300))

    def test_location_gives_slice_and_point(self, ct_volume):
        finding = FindingResult(MASS, 0.8, location=ct_volume.index_to_patient(60, 250.4, 300))
        index, point = key_image_position(ct_volume, finding)
        assert index == 60
        assert point == pytest.approx((250.4, 300))

    def test_key_image_gives_slice_only(self, ct_volume):
        finding = FindingResult(MASS, 0.8, key_sop_instance_uid=ct_volume.sop_instance_uids[7])
        assert key_image_position(ct_volume, finding) == (7, None)

    def test_location_outside_volume_raises(self, ct_volume):
        finding = FindingResult(MASS, 0.8, location=(0.0, 0.0, 2000.0))
        with pytest.raises(ValueError, match="lies outside the volume"):
            key_image_position(ct_volume, finding)

    def test_finding_without_position_raises(self, ct_volume):
        with pytest.raises(ValueError, match="neither a location nor a key image"):
            key_image_position(ct_volume, FindingResult(MASS, 0.8))


class TestBuildKeyImage:
    def test_key_image_reads_back_and_passes_dciodvfy(self, ct_series, ct_volume, tmp_path):
        index = 60
        source = {ds.SOPInstanceUID: ds for ds in ct_series}[ct_volume.sop_instance_uids[index]]
        mask = np.zeros(ct_volume.shape[1:], bool)
        mask[240:280, 280:330] = True
        finding = FindingResult(MASS, 0.83, key_sop_instance_uid=source.SOPInstanceUID)
        sc = build_key_image(source, ct_volume.pixels[index], finding, MODEL, mask=mask)
        path = tmp_path / "key.dcm"
        sc.save_as(path, enforce_file_format=True)
        dciodvfy = shutil.which("dciodvfy")
        if dciodvfy is None:
            pytest.skip("dciodvfy (dicom3tools) is not installed")
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and "Error" not in run.stderr, run.stderr

        back = hd.imread(path)
        assert back.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert back.StudyInstanceUID == source.StudyInstanceUID
        assert back.SeriesInstanceUID != source.SeriesInstanceUID
        assert back.PatientID == source.PatientID
        assert back.BurnedInAnnotation == "YES"
        assert "not for diagnostic use" in back.SeriesDescription
        assert back.ImageComments == DISCLAIMER
        assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        pixels = pydicom.dcmread(path).pixel_array
        assert pixels.shape == (512, 512, 3)
        # The mask's contour is drawn in the mark colour.
        assert tuple(pixels[240, 300]) == MARK_COLOR
        assert tuple(pixels[260, 300]) != MARK_COLOR  # inside the lesion: the image itself
        assert back.PatientOrientation == ["L", "P"]

    def test_small_image_is_enlarged_with_spacing_scaled(self):
        source = pydicom.dcmread(
            pydicom.data.get_testdata_file("CT_small.dcm")  # 128 x 128
        )
        volume = volume_from_datasets([source])
        finding = FindingResult(MASS, 0.6, key_sop_instance_uid=source.SOPInstanceUID)
        sc = build_key_image(source, volume.pixels[0], finding, MODEL, point=(64.0, 64.0))
        assert (sc.Rows, sc.Columns) == (512, 512)
        assert float(sc.PixelSpacing[0]) == pytest.approx(float(source.PixelSpacing[0]) / 4)

    def test_same_inputs_give_same_uids(self, ct_series, ct_volume):
        source = {ds.SOPInstanceUID: ds for ds in ct_series}[ct_volume.sop_instance_uids[3]]
        finding = FindingResult(MASS, 0.83, key_sop_instance_uid=source.SOPInstanceUID)
        first = build_key_image(source, ct_volume.pixels[3], finding, MODEL)
        again = build_key_image(source, ct_volume.pixels[3], finding, MODEL)
        assert first.SOPInstanceUID == again.SOPInstanceUID
        assert (first.SeriesInstanceUID, first.SOPInstanceUID) == key_image_uids(
            source.StudyInstanceUID, MODEL, "mass", source.SOPInstanceUID
        )

    def test_mask_of_other_shape_raises(self, ct_series, ct_volume):
        finding = FindingResult(MASS, 0.83)
        with pytest.raises(ValueError, match=r"mask shape \(3, 3\) differs from frame shape"):
            build_key_image(
                ct_series[0], ct_volume.pixels[0], finding, MODEL, mask=np.zeros((3, 3), bool)
            )
