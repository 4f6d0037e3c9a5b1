"""What a model may find, and what it found: the contract between models/, pipeline/ and flows/.

A model bundle declares its findings (:class:`FindingDefinition`); running it on
one series yields a :class:`ModelResult` holding one :class:`FindingResult` per
declared finding. The priority policy and the SR builder consume these. Nothing
here runs a model, reads a file or knows about the archive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from pydicom.sr.coding import Code


class SeverityValues(StrEnum):
    """How urgent a finding is when present (drives the priority class)."""

    CRITICAL = "critical"
    """Needs a radiologist now (e.g. intracranial hemorrhage): STAT."""
    URGENT = "urgent"
    """Should be read soon: URGENT."""
    ROUTINE = "routine"
    """Worth noting; does not reorder the worklist: ROUTINE."""


@dataclass(frozen=True)
class ModelIdentity:
    """Which algorithm produced a result (goes into the SR's algorithm identification)."""

    name: str
    version: str
    weights_sha256: str

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ModelIdentity.name must not be empty")
        if not self.version:
            raise ValueError("ModelIdentity.version must not be empty")


@dataclass(frozen=True)
class FindingDefinition:
    """A finding a model can report, as its bundle declares it.

    Parameters
    ----------
    key : str
        Name of the finding in the bundle's output (e.g. ``"hemorrhage"``).
    concept : pydicom.sr.coding.Code
        The coded concept of the finding (SNOMED CT or RadLex where one exists).
    severity : SeverityValues | str
        How urgent the finding is when present.
    threshold : float
        Operating threshold: the finding is present when probability >= threshold.
    """

    key: str
    concept: Code
    severity: SeverityValues
    threshold: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "severity", SeverityValues(self.severity))
        if not self.key:
            raise ValueError("FindingDefinition.key must not be empty")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"FindingDefinition.threshold must lie in [0, 1], got {self.threshold}"
            )


@dataclass(frozen=True)
class FindingResult:
    """One declared finding, evaluated on one series.

    ``volume_ml`` and ``location`` are set when the model gives a mask;
    ``key_sop_instance_uid`` names the image where the finding is best seen
    (the key image), when the model points at one.
    """

    definition: FindingDefinition
    probability: float
    volume_ml: float | None = None
    location: tuple[float, float, float] | None = None
    """Centroid in patient coordinates (mm, PS3.3 C.7.6.2.1.1)."""
    key_sop_instance_uid: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(
                f"FindingResult.probability must lie in [0, 1], got {self.probability}"
            )
        if self.volume_ml is not None and self.volume_ml < 0:
            raise ValueError("FindingResult.volume_ml must not be negative")

    @property
    def present(self) -> bool:
        """True when the probability reaches the finding's operating threshold."""
        return self.probability >= self.definition.threshold


@dataclass(frozen=True)
class ModelResult:
    """Everything one model said about one series."""

    model: ModelIdentity
    series_instance_uid: str
    findings: tuple[FindingResult, ...] = field(default_factory=tuple)
    inference_seconds: float = 0.0
