"""Shared fixtures for pipeline/ tests: real data from ../shared/data and small synthetic series."""

from __future__ import annotations

from collections.abc import Callable

import pydicom
import pytest

from tests.pipeline.support import make_slice, shared_data


@pytest.fixture(scope="session")
def ct_series() -> list[pydicom.Dataset]:
    """The real 134-slice CT (with pixel data), in file-name order."""
    folder = shared_data("ct-pancreas-tcia")
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


@pytest.fixture(scope="session")
def ct_headers() -> list[pydicom.Dataset]:
    """The real 134-slice CT, headers only (what the SR builder gets)."""
    folder = shared_data("ct-pancreas-tcia")
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]


@pytest.fixture
def synthetic_series() -> Callable[..., list[pydicom.Dataset]]:
    """Factory: `n` axial slices `spacing` mm apart, each filled with 1000 + instance number."""

    def factory(n: int = 5, spacing: float = 2.5, **kwargs: object) -> list[pydicom.Dataset]:
        return [
            make_slice((0.0, 0.0, 10.0 + k * spacing), instance_number=k + 1, **kwargs)  # type: ignore[arg-type]
            for k in range(n)
        ]

    return factory
