"""Which models apply to which series: selection rules as data.

A model bundle declares a :class:`SeriesRule`; the triage flow describes each
series of a study as a :class:`SeriesDescriptor` (from the index and one
header) and runs the models whose rule matches. Pure: no I/O, no registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


def _upper_tuple(values: object) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    return tuple(str(v).strip().upper() for v in values)  # type: ignore[union-attr]


@dataclass(frozen=True)
class SeriesDescriptor:
    """What selection rules look at in a series (values as in the DICOM header)."""

    series_instance_uid: str
    modality: str
    body_part_examined: str = ""
    series_description: str = ""
    image_type: tuple[str, ...] = ()
    number_of_instances: int = 0
    study_description: str = ""


@dataclass(frozen=True)
class SeriesRule:
    """A model's applicability rule; every given criterion must hold.

    Parameters
    ----------
    modality : tuple[str, ...]
        Accepted Modality values (0008,0060), e.g. ``("CT",)``. Required.
    body_part : tuple[str, ...]
        Accepted Body Part Examined values (0018,0015); empty accepts any. A series
        without Body Part Examined matches when ``body_part_keywords`` finds a
        keyword in the series or study description.
    body_part_keywords : tuple[str, ...]
        Words looked for (case-insensitive) in series/study description when the
        series has no Body Part Examined (e.g. ``("HEAD", "BRAIN")``).
    series_description : str | None
        Regular expression searched (case-insensitive) in Series Description.
    exclude_series_description : str | None
        Regular expression that, when found, excludes the series (e.g. ``"SCOUT|LOCALIZER"``).
    image_type_includes : tuple[str, ...]
        Values that must all appear in Image Type (0008,0008), e.g. ``("AXIAL",)``.
    min_instances, max_instances : int | None
        Bounds on the number of instances (slices) in the series.
    """

    modality: tuple[str, ...]
    body_part: tuple[str, ...] = ()
    body_part_keywords: tuple[str, ...] = ()
    series_description: str | None = None
    exclude_series_description: str | None = None
    image_type_includes: tuple[str, ...] = ()
    min_instances: int | None = None
    max_instances: int | None = None
    _patterns: tuple[re.Pattern[str] | None, re.Pattern[str] | None] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "modality", _upper_tuple(self.modality))
        object.__setattr__(self, "body_part", _upper_tuple(self.body_part))
        object.__setattr__(self, "body_part_keywords", _upper_tuple(self.body_part_keywords))
        object.__setattr__(self, "image_type_includes", _upper_tuple(self.image_type_includes))
        if not self.modality:
            raise ValueError("SeriesRule.modality must name at least one modality")
        patterns = []
        for name in ("series_description", "exclude_series_description"):
            expr = getattr(self, name)
            try:
                patterns.append(re.compile(expr, re.IGNORECASE) if expr else None)
            except re.error as exc:
                raise ValueError(
                    f"SeriesRule.{name} is not a valid regular expression: {exc}"
                ) from exc
        if (
            self.min_instances is not None
            and self.max_instances is not None
            and self.min_instances > self.max_instances
        ):
            raise ValueError("SeriesRule.min_instances must not exceed max_instances")
        object.__setattr__(self, "_patterns", tuple(patterns))

    def matches(self, series: SeriesDescriptor) -> bool:
        """Return True if every criterion of the rule holds for `series`."""
        if series.modality.strip().upper() not in self.modality:
            return False
        if self.body_part and not self._body_part_matches(series):
            return False
        include, exclude = self._patterns
        if include is not None and not include.search(series.series_description or ""):
            return False
        if exclude is not None and exclude.search(series.series_description or ""):
            return False
        image_type = {v.strip().upper() for v in series.image_type}
        if any(v not in image_type for v in self.image_type_includes):
            return False
        if self.min_instances is not None and series.number_of_instances < self.min_instances:
            return False
        return not (
            self.max_instances is not None and series.number_of_instances > self.max_instances
        )

    def _body_part_matches(self, series: SeriesDescriptor) -> bool:
        body_part = series.body_part_examined.strip().upper()
        if body_part:
            return body_part in self.body_part
        # Tolerant reading: many modalities leave Body Part Examined empty.
        text = f"{series.series_description} {series.study_description}".upper()
        return any(word in text for word in self.body_part_keywords)
