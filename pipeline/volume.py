"""A series as a volume: the array a model sees, with the geometry needed to map back.

:class:`Volume` is the contract between pipeline/ (which builds it from a
series' datasets) and models/ (which runs networks on it). Array axes follow
numpy order: (slices, rows, columns). Values are in modality units after the
Modality LUT (Rescale Slope/Intercept), i.e. Hounsfield units for CT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Volume:
    """Pixel data of one series in patient geometry.

    Parameters
    ----------
    pixels : numpy.ndarray
        float32 array of shape (slices, rows, columns); a single 2D image has one slice.
        Slices are ordered by increasing position along the slice normal
        (the cross product of the row and column direction cosines).
    spacing : tuple[float, float, float]
        (slice spacing, row spacing, column spacing) in mm. Row spacing is the
        distance between rows, i.e. Pixel Spacing[0] (PS3.3 10.7.1.3).
    origin : tuple[float, float, float]
        Image Position (Patient) of the first slice's first pixel, LPS mm.
    orientation : tuple[float, ...]
        Image Orientation (Patient): row then column direction cosines (6 values).
    sop_instance_uids : tuple[str, ...]
        SOP Instance UID of each slice, in array order (for key images and SR references).
    modality : str
        Modality (0008,0060) of the series.
    series_instance_uid : str
        Series Instance UID (0020,000E).
    frame_of_reference_uid : str | None
        Frame of Reference UID (0020,0052), needed for 3D coordinates in an SR.
    """

    pixels: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    orientation: tuple[float, ...]
    sop_instance_uids: tuple[str, ...]
    modality: str
    series_instance_uid: str
    frame_of_reference_uid: str | None = None

    def __post_init__(self) -> None:
        if self.pixels.ndim != 3:
            raise ValueError(
                f"Volume.pixels must be 3D (slices, rows, columns), got {self.pixels.shape}"
            )
        if len(self.sop_instance_uids) != self.pixels.shape[0]:
            raise ValueError(
                "Volume.sop_instance_uids must name one instance per slice "
                f"({len(self.sop_instance_uids)} != {self.pixels.shape[0]})"
            )
        if len(self.orientation) != 6:
            raise ValueError("Volume.orientation must hold 6 direction cosines")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"Volume.spacing must be positive, got {self.spacing}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing)) / 1000.0

    def index_to_patient(self, k: float, j: float, i: float) -> tuple[float, float, float]:
        """Map a (slice, row, column) index to patient coordinates (LPS, mm).

        References
        ----------
        PS3.3 C.7.6.2.1.1, https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_C.7.6.2.html
        """
        row_cos = np.asarray(self.orientation[:3], dtype=float)
        col_cos = np.asarray(self.orientation[3:], dtype=float)
        normal = np.cross(row_cos, col_cos)
        point = (
            np.asarray(self.origin, dtype=float)
            + i * self.spacing[2] * row_cos
            + j * self.spacing[1] * col_cos
            + k * self.spacing[0] * normal
        )
        return (float(point[0]), float(point[1]), float(point[2]))
