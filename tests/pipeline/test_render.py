"""Tests for pipeline/render.py: VOI windowing, MONOCHROME1, thumbnails, encoding."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image

from pipeline.render import (
    ImageFormatValues,
    VOILUTFunctionValues,
    Window,
    apply_window,
    auto_window,
    encode_image,
    render_dataset,
    render_frame,
    render_volume_slice,
    thumbnail,
    window_from_dataset,
)
from pipeline.volume import PixelDataError, volume_from_datasets
from tests.pipeline.support import make_slice, shared_data


class TestApplyWindow:
    def test_linear_window_maps_edges_to_black_and_white(self):
        values = np.array([[-1000.0, -160.0, 40.0, 240.0, 3000.0]])
        image = apply_window(values, Window(40, 400))
        assert image.tolist() == [[0, 0, 128, 255, 255]]

    def test_linear_exact_uses_width_as_is(self):
        image = apply_window(np.array([[0.0, 50.0, 100.0]]), Window(50, 100, "LINEAR_EXACT"))
        assert image.tolist() == [[0, 128, 255]]

    def test_sigmoid_is_half_grey_at_center(self):
        image = apply_window(np.array([[50.0]]), Window(50, 100, VOILUTFunctionValues.SIGMOID))
        assert image.tolist() == [[128]]

    def test_linear_width_below_one_raises(self):
        with pytest.raises(ValueError, match="width must be at least 1 for LINEAR"):
            Window(0, 0.5)


class TestWindowFromDataset:
    def test_first_of_several_windows_is_used(self):
        ds = pydicom.Dataset()
        ds.WindowCenter = [40, 600]
        ds.WindowWidth = [400, 2000]
        assert window_from_dataset(ds) == Window(40.0, 400.0)

    def test_frame_voi_lut_of_multiframe(self):
        folder = shared_data("sr-seg", "dcmqi", "segmentations", "23x38x3", "multiframe")
        ds = pydicom.dcmread(folder / "mf.dcm")
        assert window_from_dataset(ds) == Window(1.0, 2.0)

    def test_no_window_gives_none(self):
        assert window_from_dataset(pydicom.Dataset()) is None

    def test_unknown_function_is_read_as_linear(self):
        ds = pydicom.Dataset()
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 10, 20, "CUBIC"
        assert window_from_dataset(ds).function is VOILUTFunctionValues.LINEAR


class TestRender:
    def test_ct_slice_uses_header_window(self, ct_series):
        image = render_dataset(ct_series[60])
        assert image.dtype == np.uint8 and image.shape == (512, 512)
        assert image[:20, :20].max() == 0  # air is black in a 40/400 window
        assert image.max() == 255

    def test_render_dataset_matches_render_of_volume_slice(self, ct_series):
        volume = volume_from_datasets(ct_series[:5])
        by_uid = {ds.SOPInstanceUID: ds for ds in ct_series[:5]}
        first = by_uid[volume.sop_instance_uids[0]]
        window = window_from_dataset(first)
        assert np.array_equal(render_dataset(first), render_volume_slice(volume, 0, window))

    def test_monochrome1_is_inverted(self):
        ds = make_slice((0, 0, 0), pixels=np.array([[0, 1000], [2000, 3000]], np.uint16))
        ds.WindowCenter, ds.WindowWidth = 476, 2000  # around the rescaled values
        normal = render_dataset(ds)
        ds.PhotometricInterpretation = "MONOCHROME1"
        inverted = render_dataset(ds)
        assert np.array_equal(inverted, 255 - normal)

    def test_compressed_mr_renders_like_uncompressed(self):
        folder = shared_data("transfer-syntaxes")
        reference = render_dataset(pydicom.dcmread(folder / "1.dcm"))
        assert np.array_equal(render_dataset(pydicom.dcmread(folder / "9.dcm")), reference)

    def test_no_window_uses_percentiles(self):
        values = np.linspace(0, 1000, 10000).reshape(100, 100)
        window = auto_window(values)
        assert window.center == pytest.approx(500, abs=1)
        assert render_frame(values).min() == 0 and render_frame(values).max() == 255

    def test_missing_frame_raises(self):
        with pytest.raises(PixelDataError, match="frame 3 does not exist"):
            render_dataset(make_slice((0, 0, 0)), frame=3)

    def test_slice_outside_volume_raises(self, synthetic_series):
        volume = volume_from_datasets(synthetic_series(n=2))
        with pytest.raises(IndexError, match="slice index 2 outside"):
            render_volume_slice(volume, 2)


class TestThumbnailAndEncoding:
    def test_thumbnail_keeps_aspect(self):
        image = np.zeros((300, 600), np.uint8)
        assert thumbnail(image, 128).shape == (64, 128)

    def test_small_image_is_not_enlarged(self):
        image = np.zeros((30, 60), np.uint8)
        assert thumbnail(image, 128) is image

    @pytest.mark.parametrize("image_format", ["png", "jpeg"])
    def test_encoded_bytes_decode_to_same_size(self, image_format):
        image = (np.arange(64 * 32) % 256).astype(np.uint8).reshape(32, 64)
        data = encode_image(image, image_format)
        decoded = Image.open(io.BytesIO(data))
        assert decoded.size == (64, 32)
        assert decoded.format == image_format.upper()
        assert ImageFormatValues(image_format).media_type == f"image/{image_format}"

    def test_png_is_lossless(self):
        image = (np.arange(64 * 32) % 256).astype(np.uint8).reshape(32, 64)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(image)))), image)

    def test_float_image_raises(self):
        with pytest.raises(ValueError, match="encode_image needs uint8"):
            encode_image(np.zeros((4, 4), np.float32))
