"""Tests for pipeline/volume.py: series -> Volume, with real and crafted series."""

from __future__ import annotations

import copy
import random

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.uid import RLELossless

from pipeline.volume import (
    InconsistentGeometryError,
    PixelDataError,
    Volume,
    VolumeError,
    volume_from_datasets,
)
from tests.pipeline.support import make_slice, shared_data


class TestVolumeFromRealCT:
    def test_shuffled_series_gives_same_volume(self, ct_series):
        in_order = volume_from_datasets(ct_series)
        shuffled = list(ct_series)
        random.Random(7).shuffle(shuffled)
        again = volume_from_datasets(shuffled)
        assert np.array_equal(in_order.pixels, again.pixels)
        assert in_order.sop_instance_uids == again.sop_instance_uids
        assert in_order.origin == again.origin

    def test_geometry_comes_from_positions(self, ct_series):
        volume = volume_from_datasets(ct_series)
        assert volume.shape == (134, 512, 512)
        assert volume.pixels.dtype == np.float32
        assert volume.spacing == pytest.approx((3.0, 1.07421875, 1.07421875))
        assert volume.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        # Slices run along +z (the normal of an axial image): lowest z first.
        assert volume.origin == pytest.approx((-275.0, -178.1, 85.91))
        assert volume.index_to_patient(133, 0, 0) == pytest.approx((-275.0, -178.1, 484.91))
        by_uid = {ds.SOPInstanceUID: ds for ds in ct_series}
        z = [float(by_uid[uid].ImagePositionPatient[2]) for uid in volume.sop_instance_uids]
        assert z == sorted(z)
        assert volume.frame_of_reference_uid == ct_series[0].FrameOfReferenceUID
        assert volume.series_instance_uid == ct_series[0].SeriesInstanceUID
        assert volume.modality == "CT"

    def test_values_are_hounsfield_units(self, ct_series):
        volume = volume_from_datasets(ct_series)
        assert volume.pixels.min() >= -1100  # nothing below air
        assert volume.pixels.max() < 4000
        air = volume.pixels[:, :20, :20]  # corner outside the patient
        assert np.median(air) == pytest.approx(-1000, abs=50)
        centre = volume.pixels[67, 200:300, 200:300]  # abdomen: soft tissue, fat
        assert -200 < float(np.median(centre)) < 150


class TestVolumeFromTransferSyntaxes:
    def test_all_transfer_syntaxes_decode_to_same_pixels(self):
        folder = shared_data("transfer-syntaxes")
        files = sorted(folder.glob("*.dcm"))
        assert len(files) == 9
        volumes = {p.name: volume_from_datasets([pydicom.dcmread(p)]) for p in files}
        reference = volumes["1.dcm"].pixels
        syntaxes = set()
        for name, volume in volumes.items():
            assert volume.shape == (1, 384, 384), name
            assert np.array_equal(volume.pixels, reference), name
            syntaxes.add(pydicom.dcmread(folder / name).file_meta.TransferSyntaxUID)
        assert len(syntaxes) == 7  # 9 files, 7 distinct transfer syntaxes
        assert reference.max() > 0


class TestVolumeFromSingleImages:
    def test_single_mr_slice_is_one_slice_volume(self):
        ds = pydicom.dcmread(shared_data("transfer-syntaxes", "1.dcm"))
        volume = volume_from_datasets([ds])
        assert volume.shape == (1, 384, 384)
        assert volume.origin == pytest.approx(tuple(float(v) for v in ds.ImagePositionPatient))
        assert volume.spacing[1:] == pytest.approx(tuple(float(v) for v in ds.PixelSpacing))
        assert volume.frame_of_reference_uid == ds.FrameOfReferenceUID

    def test_projection_radiograph_has_no_patient_geometry(self):
        ds = pydicom.dcmread(shared_data("sr-seg", "highdicom", "dx_image.dcm"))
        volume = volume_from_datasets([ds])
        assert volume.shape == (1, int(ds.Rows), int(ds.Columns))
        assert volume.origin == (0.0, 0.0, 0.0)
        assert volume.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        assert volume.frame_of_reference_uid is None


class TestVolumeFromMultiFrame:
    def test_legacy_converted_enhanced_ct_equals_its_single_frames(self):
        folder = shared_data("sr-seg", "dcmqi", "segmentations", "23x38x3")
        multi = volume_from_datasets([pydicom.dcmread(folder / "multiframe" / "mf.dcm")])
        single = volume_from_datasets(
            [pydicom.dcmread(p) for p in sorted((folder / "image").glob("*.dcm"))]
        )
        assert multi.shape == single.shape == (3, 38, 23)
        assert np.array_equal(multi.pixels, single.pixels)
        assert multi.origin == pytest.approx(single.origin)
        assert multi.spacing == pytest.approx(single.spacing)
        assert multi.orientation == pytest.approx(single.orientation)

    def test_several_multiframe_instances_raise(self):
        folder = shared_data("sr-seg", "dcmqi", "segmentations", "23x38x3")
        ds = pydicom.dcmread(folder / "multiframe" / "mf.dcm")
        other = copy.deepcopy(ds)
        other.SOPInstanceUID = "1.2.3.4"
        with pytest.raises(VolumeError, match="multi-frame volume is built from one instance"):
            volume_from_datasets([ds, other])


class TestVolumeFromSyntheticSeries:
    def test_order_ignores_instance_number(self, synthetic_series):
        datasets = synthetic_series(n=4)
        for ds, number in zip(datasets, (3, 1, 4, 2), strict=True):
            ds.InstanceNumber = number
        volume = volume_from_datasets(list(reversed(datasets)))
        assert volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in datasets)
        assert volume.origin == (0.0, 0.0, 10.0)

    def test_spacing_comes_from_positions_not_slice_thickness(self, synthetic_series):
        volume = volume_from_datasets(synthetic_series(n=5, spacing=2.5))
        assert volume.spacing == pytest.approx((2.5, 0.5, 0.7))

    def test_rescale_applied_per_slice(self, synthetic_series):
        datasets = synthetic_series(n=3)
        datasets[1].RescaleSlope, datasets[1].RescaleIntercept = 2.0, -10.0
        volume = volume_from_datasets(datasets)
        assert volume.pixels[0, 0, 0] == 1001 - 1024
        assert volume.pixels[1, 0, 0] == 2 * 1002 - 10
        assert volume.pixels[2, 0, 0] == 1003 - 1024

    def test_modality_lut_sequence_is_applied(self, synthetic_series):
        datasets = synthetic_series(n=1, pixels=np.array([[0, 1], [2, 3]], np.uint16))
        del datasets[0].RescaleSlope, datasets[0].RescaleIntercept
        lut = pydicom.Dataset()
        lut.LUTDescriptor = [4, 0, 16]
        lut.ModalityLUTType = "HU"
        lut.LUTData = [10, 20, 30, 40]
        datasets[0].ModalityLUTSequence = [lut]
        assert volume_from_datasets(datasets).pixels[0].tolist() == [[10, 20], [30, 40]]

    def test_dataset_without_file_meta_decodes_by_its_encoding(self, ct_series):
        received = copy.deepcopy(ct_series[0])  # as a network peer would hand it over
        del received.file_meta
        volume = volume_from_datasets([received])
        assert np.array_equal(volume.pixels, volume_from_datasets([ct_series[0]]).pixels)

    def test_missing_rescale_means_identity(self, synthetic_series):
        volume = volume_from_datasets(synthetic_series(n=2, rescale=None))
        assert volume.pixels[:, 0, 0].tolist() == [1001.0, 1002.0]

    def test_sagittal_stack_runs_along_its_normal(self):
        # Row direction +y, column direction -z: the normal is -x.
        orientation = (0, 1, 0, 0, 0, -1)
        datasets = [
            make_slice((x, 0, 0), orientation=orientation, instance_number=n)
            for n, x in enumerate((20.0, 22.0, 24.0), start=1)
        ]
        volume = volume_from_datasets(datasets)
        assert volume.origin == (24.0, 0.0, 0.0)
        assert volume.index_to_patient(2, 0, 0) == pytest.approx((20.0, 0.0, 0.0))

    def test_small_position_jitter_is_tolerated(self, synthetic_series):
        datasets = synthetic_series(n=5, spacing=2.5)
        datasets[2].ImagePositionPatient = [0.0, 0.0, 15.04]
        assert volume_from_datasets(datasets).spacing[0] == pytest.approx(2.5)


class TestVolumeGeometryErrors:
    def test_empty_input_raises(self):
        with pytest.raises(VolumeError, match="at least one dataset"):
            volume_from_datasets([])

    def test_mixed_orientations_raise(self, synthetic_series):
        datasets = synthetic_series(n=3)
        datasets[1].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        with pytest.raises(InconsistentGeometryError, match=r"Image Orientation .* differs"):
            volume_from_datasets(datasets)

    def test_duplicate_positions_raise(self, synthetic_series):
        datasets = synthetic_series(n=4)
        datasets[3].ImagePositionPatient = datasets[1].ImagePositionPatient
        with pytest.raises(InconsistentGeometryError, match="duplicate slice positions"):
            volume_from_datasets(datasets)

    def test_missing_slice_raises_irregular_spacing(self, synthetic_series):
        datasets = synthetic_series(n=6)
        del datasets[3]
        with pytest.raises(InconsistentGeometryError, match="irregular slice spacing"):
            volume_from_datasets(datasets)

    def test_tilted_stack_raises(self, synthetic_series):
        datasets = synthetic_series(n=4, spacing=2.5)
        for k, ds in enumerate(datasets):
            ds.ImagePositionPatient = [0.0, k * 0.8, 10.0 + k * 2.5]  # about 18 deg of tilt
        with pytest.raises(InconsistentGeometryError, match="not stacked along the slice normal"):
            volume_from_datasets(datasets)

    def test_differing_rows_raise(self, synthetic_series):
        datasets = synthetic_series(n=3)
        datasets[2] = make_slice(
            datasets[2].ImagePositionPatient, pixels=np.zeros((5, 6), np.uint16)
        )
        with pytest.raises(InconsistentGeometryError, match="Rows differs"):
            volume_from_datasets(datasets)

    def test_differing_frame_of_reference_raises(self, synthetic_series):
        datasets = synthetic_series(n=3)
        datasets[0].FrameOfReferenceUID = "1.2.3.999"
        with pytest.raises(InconsistentGeometryError, match="FrameOfReferenceUID differs"):
            volume_from_datasets(datasets)

    def test_differing_pixel_spacing_raises(self, synthetic_series):
        datasets = synthetic_series(n=3)
        datasets[0].PixelSpacing = [0.9, 0.9]
        with pytest.raises(InconsistentGeometryError, match="Pixel Spacing differs"):
            volume_from_datasets(datasets)

    def test_two_series_raise(self, synthetic_series):
        datasets = synthetic_series(n=3)
        datasets[0].SeriesInstanceUID = "1.2.3.998"
        with pytest.raises(InconsistentGeometryError, match="belong to 2 series"):
            volume_from_datasets(datasets)

    def test_missing_position_raises(self, synthetic_series):
        datasets = synthetic_series(n=3)
        del datasets[1].ImagePositionPatient
        with pytest.raises(InconsistentGeometryError, match="no Image Position"):
            volume_from_datasets(datasets)

    def test_error_messages_carry_no_patient_data(self, synthetic_series):
        datasets = synthetic_series(n=4)
        datasets[3].ImagePositionPatient = datasets[1].ImagePositionPatient
        with pytest.raises(InconsistentGeometryError) as info:
            volume_from_datasets(datasets)
        assert "Secret" not in str(info.value)
        assert "SECRET-ID" not in str(info.value)


class TestVolumePixelDataErrors:
    def test_missing_pixel_data_raises(self, synthetic_series):
        datasets = synthetic_series(n=2)
        del datasets[0].PixelData
        with pytest.raises(PixelDataError, match=r"has no Pixel Data \(7FE0,0010\)"):
            volume_from_datasets(datasets)

    def test_truncated_pixel_data_raises(self, synthetic_series):
        datasets = synthetic_series(n=2)
        datasets[1].PixelData = datasets[1].PixelData[:-10]
        with pytest.raises(PixelDataError, match=r"cannot be decoded \(truncated or corrupt\)"):
            volume_from_datasets(datasets)

    def test_corrupt_jpeg_raises(self):
        ds = pydicom.dcmread(shared_data("transfer-syntaxes", "9.dcm"))  # JPEG 2000
        frame = next(generate_fragments(ds.PixelData))
        ds.PixelData = encapsulate([frame[:200] + b"\x00" * 50])
        with pytest.raises(PixelDataError, match=r"JPEG 2000 .* cannot be decoded"):
            volume_from_datasets([ds])

    def test_unknown_transfer_syntax_raises(self, synthetic_series):
        datasets = synthetic_series(n=1)
        datasets[0].file_meta.TransferSyntaxUID = "1.2.3.4.5.6"
        with pytest.raises(PixelDataError, match="no pixel data decoder for transfer syntax"):
            volume_from_datasets(datasets)

    def test_rle_with_garbage_raises(self, synthetic_series):
        datasets = synthetic_series(n=1)
        datasets[0].file_meta.TransferSyntaxUID = RLELossless
        datasets[0].PixelData = encapsulate([b"\x01\x00\x00\x00" + b"\xff" * 60])
        with pytest.raises(PixelDataError, match="RLE Lossless cannot be decoded"):
            volume_from_datasets(datasets)

    def test_color_image_raises(self, synthetic_series):
        datasets = synthetic_series(n=1)
        datasets[0].SamplesPerPixel = 3
        with pytest.raises(PixelDataError, match="Samples per Pixel 3"):
            volume_from_datasets(datasets)


class TestVolumeContract:
    def test_volume_rejects_wrong_number_of_uids(self):
        with pytest.raises(ValueError, match="one instance per slice"):
            Volume(
                pixels=np.zeros((2, 3, 3), np.float32),
                spacing=(1, 1, 1),
                origin=(0, 0, 0),
                orientation=(1, 0, 0, 0, 1, 0),
                sop_instance_uids=("1.2",),
                modality="CT",
                series_instance_uid="1.2.3",
            )
