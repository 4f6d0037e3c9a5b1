"""The triage priority policy: findings and order context in, priority class and score out.

Accepts the :class:`~pipeline.findings.ModelResult` objects of one study, what
the order says (:class:`OrderContext`) and a :class:`PriorityPolicy`; produces
a :class:`PriorityAssessment` (class, score, one-line reason), and, for the
worklist, an :class:`EffectivePriority` that ages with waiting time. Pure
functions: no clock (time is an argument), no I/O, no patient data in reasons.

The policy
----------
**Classes and scores.** Every study gets a priority class, STAT, URGENT or
ROUTINE, and a score from 0 to 100 (higher = read sooner). Each class owns a
band of the score, so sorting by score alone sorts by class first:
STAT 80-100, URGENT 50-79.9, ROUTINE 0-49.9.

**Findings.** A finding is *present* when its probability reaches its
operating threshold (the bundle's ``FindingDefinition.threshold``, or the
site's override in ``PriorityPolicy.threshold_overrides``), and
*high-confidence* when it also reaches the high-confidence threshold
(``high_confidence_threshold``, default 0.9; per-finding overrides in
``high_confidence_thresholds``). A present finding raises the study to the
class of its severity: critical -> STAT, urgent -> URGENT, routine -> ROUTINE.
With ``stat_requires_high_confidence`` a critical finding that is present but
not high-confidence counts as URGENT (fewer STAT alerts, at the cost of
sensitivity). Within the class band a present finding scores in the lower
half when below high confidence and in the upper half when at or above it,
rising linearly with probability. A routine-severity finding scores 25-49.9.
When no finding is present the study is ROUTINE and scores 0-20 in
proportion to the highest probability/threshold ratio among its critical and
urgent findings, so near misses are read before clear negatives. The study's
class and score are those of its highest-scoring finding.

**Order.** Requested Procedure Priority (0040,1003) is read tolerantly
(STAT, HIGH, MEDIUM, ROUTINE, LOW and common synonyms such as URGENT, ASAP,
EMERGENCY, S/A/R). A STAT order makes the study at least STAT (score at
least 80); a HIGH order at least URGENT (at least 50). A Current Patient
Location (0038,0300) that names the emergency department, or a Reason for the
Requested Procedure that contains an urgent keyword (stroke, trauma,
hemorrhage, ...), makes it at least URGENT. MEDIUM, ROUTINE and LOW change
nothing. The order can only raise priority, never lower what the AI found.

**Aging (worklist).** Each class has a maximum wait (defaults: STAT 1 h,
URGENT 4 h, ROUTINE 24 h). A study that has waited ``w`` of its class's cap
``c`` has the effective score ``s + (100 - s) * min(w / c, 1)``: it climbs
linearly from its own score to 100, the top of the list, exactly when the cap
is reached. Past the cap it is *overdue* and scores ``100 + hours overdue``,
above every study that is not, the longest-overdue first. The worklist sorts
by effective score, then by waiting time (longest first). The formula is
linear in time, so a database can evaluate it in its ORDER BY.

References
----------
PS3.3 C.4.11 Requested Procedure Priority (0040,1003) and C.2.3 Current
Patient Location (0038,0300),
https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_C.4.11.html
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType

import pydicom

from pipeline.findings import FindingResult, ModelResult, SeverityValues


class PriorityClassValues(StrEnum):
    """How soon a study should be read."""

    STAT = "STAT"
    URGENT = "URGENT"
    ROUTINE = "ROUTINE"

    @property
    def rank(self) -> int:
        """2 for STAT, 1 for URGENT, 0 for ROUTINE (higher = sooner)."""
        return {"STAT": 2, "URGENT": 1, "ROUTINE": 0}[self.value]


class RequestedProcedurePriorityValues(StrEnum):
    """Enumerated values of Requested Procedure Priority (0040,1003), PS3.3 C.4.11."""

    STAT = "STAT"
    HIGH = "HIGH"
    ROUTINE = "ROUTINE"
    MEDIUM = "MEDIUM"
    LOW = "LOW"


SCORE_BANDS: Mapping[PriorityClassValues, tuple[float, float]] = MappingProxyType(
    {
        PriorityClassValues.STAT: (80.0, 100.0),
        PriorityClassValues.URGENT: (50.0, 79.9),
        PriorityClassValues.ROUTINE: (0.0, 49.9),
    }
)
"""The score band (lowest, highest) of each priority class."""

_ROUTINE_FINDING_LOW = 25.0
_NEAR_MISS_HIGH = 20.0

_ORDER_PRIORITY_SYNONYMS = {
    "STAT": RequestedProcedurePriorityValues.STAT,
    "S": RequestedProcedurePriorityValues.STAT,
    "EMERGENCY": RequestedProcedurePriorityValues.STAT,
    "EMERGENT": RequestedProcedurePriorityValues.STAT,
    "IMMEDIATE": RequestedProcedurePriorityValues.STAT,
    "HIGH": RequestedProcedurePriorityValues.HIGH,
    "URGENT": RequestedProcedurePriorityValues.HIGH,
    "ASAP": RequestedProcedurePriorityValues.HIGH,
    "A": RequestedProcedurePriorityValues.HIGH,
    "PRIORITY": RequestedProcedurePriorityValues.HIGH,
    "MEDIUM": RequestedProcedurePriorityValues.MEDIUM,
    "ROUTINE": RequestedProcedurePriorityValues.ROUTINE,
    "R": RequestedProcedurePriorityValues.ROUTINE,
    "NORMAL": RequestedProcedurePriorityValues.ROUTINE,
    "LOW": RequestedProcedurePriorityValues.LOW,
}

_SEVERITY_CLASS = {
    SeverityValues.CRITICAL: PriorityClassValues.STAT,
    SeverityValues.URGENT: PriorityClassValues.URGENT,
    SeverityValues.ROUTINE: PriorityClassValues.ROUTINE,
}


def parse_requested_procedure_priority(value: object) -> RequestedProcedurePriorityValues | None:
    """Read a Requested Procedure Priority tolerantly; None when absent or unrecognised.

    Accepts the enumerated values in any case and with padding, and common
    synonyms from HL7 and RIS practice (``URGENT``, ``ASAP``, ``EMERGENCY``,
    ``S``/``A``/``R``).

    References
    ----------
    PS3.3 C.4.11, https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_C.4.11.html
    """
    if value is None:
        return None
    text = str(value).strip().upper()
    return _ORDER_PRIORITY_SYNONYMS.get(text)


def _first_in(ds: pydicom.Dataset, keyword: str) -> object | None:
    """`keyword` at the top level of `ds`, else in its first Request Attributes item with it."""
    value = ds.get(keyword)
    if value not in (None, ""):
        return value
    for item in ds.get("RequestAttributesSequence", []):
        value = item.get(keyword)
        if value not in (None, ""):
            return value
    return None


@dataclass(frozen=True)
class OrderContext:
    """What the order says about urgency (all optional; missing means "nothing said").

    Parameters
    ----------
    requested_procedure_priority : RequestedProcedurePriorityValues | str | None
        Requested Procedure Priority (0040,1003), tolerantly parsed.
    reason_for_requested_procedure : str
        Reason for the Requested Procedure (0040,1002). Searched for keywords
        only; never copied into a reason string.
    current_patient_location : str
        Current Patient Location (0038,0300), e.g. ``"ED"``.
    """

    requested_procedure_priority: RequestedProcedurePriorityValues | None = None
    reason_for_requested_procedure: str = ""
    current_patient_location: str = ""

    def __post_init__(self) -> None:
        raw = self.requested_procedure_priority
        parsed = raw if raw is None else parse_requested_procedure_priority(raw)
        object.__setattr__(self, "requested_procedure_priority", parsed)
        object.__setattr__(
            self, "reason_for_requested_procedure", str(self.reason_for_requested_procedure or "")
        )
        object.__setattr__(
            self, "current_patient_location", str(self.current_patient_location or "")
        )

    @classmethod
    def from_dataset(cls, ds: pydicom.Dataset) -> OrderContext:
        """Read the order context from an image header (top level or Request Attributes)."""
        return cls(
            requested_procedure_priority=parse_requested_procedure_priority(
                _first_in(ds, "RequestedProcedurePriority")
            ),
            reason_for_requested_procedure=str(
                _first_in(ds, "ReasonForTheRequestedProcedure") or ""
            ),
            current_patient_location=str(_first_in(ds, "CurrentPatientLocation") or ""),
        )


def _frozen_mapping(value: Mapping, name: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise TypeError(f"PriorityPolicy.{name} must be a mapping")
    return MappingProxyType(dict(value))


@dataclass(frozen=True)
class PriorityPolicy:
    """Site-configurable parameters of the triage policy (see the module docstring).

    Parameters
    ----------
    high_confidence_threshold : float
        Probability at or above which a present finding is high-confidence.
    high_confidence_thresholds : Mapping[str, float]
        Per finding key, overrides `high_confidence_threshold`.
    threshold_overrides : Mapping[str, float]
        Per finding key, the site's operating threshold instead of the bundle's.
    stat_requires_high_confidence : bool
        If True, a critical finding below high confidence counts as URGENT.
    emergency_location_keywords : tuple[str, ...]
        Words in Current Patient Location that mean emergency department.
    urgent_reason_keywords : tuple[str, ...]
        Words in the order's reason that make a study at least URGENT.
    max_wait : Mapping[PriorityClassValues | str, timedelta]
        Per class, the wait at which a study reaches the top of the worklist.
    """

    high_confidence_threshold: float = 0.9
    high_confidence_thresholds: Mapping[str, float] = field(default_factory=dict)
    threshold_overrides: Mapping[str, float] = field(default_factory=dict)
    stat_requires_high_confidence: bool = False
    emergency_location_keywords: tuple[str, ...] = (
        "ED",
        "ER",
        "EMERGENCY",
        "A&E",
        "TRAUMA",
        "RESUS",
    )
    urgent_reason_keywords: tuple[str, ...] = (
        "STROKE",
        "TRAUMA",
        "HEMORRHAGE",
        "HAEMORRHAGE",
        "BLEED",
        "PULMONARY EMBOLISM",
    )
    max_wait: Mapping[PriorityClassValues, timedelta] = field(
        default_factory=lambda: {
            PriorityClassValues.STAT: timedelta(hours=1),
            PriorityClassValues.URGENT: timedelta(hours=4),
            PriorityClassValues.ROUTINE: timedelta(hours=24),
        }
    )

    def __post_init__(self) -> None:
        _check_probability("high_confidence_threshold", self.high_confidence_threshold)
        for name in ("high_confidence_thresholds", "threshold_overrides"):
            mapping = _frozen_mapping(getattr(self, name), name)
            for key, value in mapping.items():
                _check_probability(f"{name}[{key!r}]", value)
            object.__setattr__(self, name, mapping)
        waits = {PriorityClassValues(k): v for k, v in dict(self.max_wait).items()}
        for priority_class in PriorityClassValues:
            wait = waits.get(priority_class)
            if not isinstance(wait, timedelta) or wait <= timedelta(0):
                raise ValueError(
                    f"PriorityPolicy.max_wait must give a positive timedelta for {priority_class}"
                )
        object.__setattr__(self, "max_wait", MappingProxyType(waits))
        for name in ("emergency_location_keywords", "urgent_reason_keywords"):
            words = tuple(str(w).strip().upper() for w in getattr(self, name) if str(w).strip())
            object.__setattr__(self, name, words)

    def operating_threshold(self, result: FindingResult) -> float:
        """The threshold at which `result`'s finding counts as present."""
        return self.threshold_overrides.get(result.definition.key, result.definition.threshold)

    def high_confidence_for(self, result: FindingResult) -> float:
        """The high-confidence threshold of `result`'s finding (never below its operating one)."""
        value = self.high_confidence_thresholds.get(
            result.definition.key, self.high_confidence_threshold
        )
        return max(value, self.operating_threshold(result))


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"PriorityPolicy.{name} must lie in [0, 1], got {value}")


DEFAULT_PRIORITY_POLICY = PriorityPolicy()


@dataclass(frozen=True)
class FindingAssessment:
    """How the policy judged one finding of one model."""

    model_name: str
    result: FindingResult
    present: bool
    high_confidence: bool
    priority_class: PriorityClassValues
    score: float


@dataclass(frozen=True)
class PriorityAssessment:
    """The triage decision for one study.

    ``findings`` holds every finding judged (present or not), highest score
    first; the SR writes present/absent from these, so it agrees with the
    worklist even where a site overrides a threshold.
    """

    priority_class: PriorityClassValues
    score: float
    reason: str
    findings: tuple[FindingAssessment, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "priority_class", PriorityClassValues(self.priority_class))
        if not 0.0 <= self.score <= 100.0:
            raise ValueError(f"PriorityAssessment.score must lie in [0, 100], got {self.score}")

    @property
    def present_findings(self) -> tuple[FindingAssessment, ...]:
        """The findings judged present, highest score first."""
        return tuple(f for f in self.findings if f.present)


def _in_band(priority_class: PriorityClassValues, fraction: float) -> float:
    low, high = SCORE_BANDS[priority_class]
    return low + min(max(fraction, 0.0), 1.0) * (high - low)


def _judge(model_name: str, result: FindingResult, policy: PriorityPolicy) -> FindingAssessment:
    threshold = policy.operating_threshold(result)
    high = policy.high_confidence_for(result)
    p = result.probability
    present = p >= threshold
    high_confidence = present and p >= high
    severity = result.definition.severity
    if not present:
        # Near miss: ROUTINE, scored by how close a critical/urgent finding came.
        weight = 0.0 if severity is SeverityValues.ROUTINE else 1.0
        ratio = p / threshold if threshold > 0 else 0.0
        return FindingAssessment(
            model_name,
            result,
            False,
            False,
            PriorityClassValues.ROUTINE,
            round(weight * min(ratio, 1.0) * _NEAR_MISS_HIGH, 1),
        )
    priority_class = _SEVERITY_CLASS[severity]
    if (
        priority_class is PriorityClassValues.STAT
        and policy.stat_requires_high_confidence
        and not high_confidence
    ):
        priority_class = PriorityClassValues.URGENT
    # Lower half of the band below high confidence, upper half at or above it.
    if high_confidence:
        fraction = 0.5 + 0.5 * ((p - high) / (1.0 - high) if high < 1.0 else 1.0)
    else:
        fraction = 0.5 * ((p - threshold) / (high - threshold) if high > threshold else 0.0)
    score = _in_band(priority_class, fraction)
    if priority_class is PriorityClassValues.ROUTINE:
        score = _ROUTINE_FINDING_LOW + fraction * (SCORE_BANDS[priority_class][1] - 25.0)
    return FindingAssessment(
        model_name, result, True, high_confidence, priority_class, round(score, 1)
    )


def _contains_word(text: str, words: Sequence[str]) -> str | None:
    upper = text.upper()
    for word in words:
        if re.search(rf"(?<![A-Z0-9]){re.escape(word)}(?![A-Z0-9])", upper):
            return word
    return None


def _describe(finding: FindingAssessment) -> str:
    name = finding.result.definition.concept.meaning
    if not finding.present:
        return f"{name} p={finding.result.probability:.2f} below threshold"
    confidence = ", high confidence" if finding.high_confidence else ""
    return (
        f"{name} present (p={finding.result.probability:.2f}, "
        f"{finding.result.definition.severity}{confidence})"
    )


def assess_priority(
    model_results: Sequence[ModelResult],
    order: OrderContext | None = None,
    policy: PriorityPolicy = DEFAULT_PRIORITY_POLICY,
) -> PriorityAssessment:
    """Decide a study's priority class, score and reason (policy: module docstring).

    Parameters
    ----------
    model_results : Sequence[ModelResult]
        Every model result for the study; may be empty (no applicable model,
        or analysis failed), in which case only the order counts.
    order : OrderContext | None
        What the order says; None when nothing is known.
    policy : PriorityPolicy
        The site's policy.

    Returns
    -------
    PriorityAssessment
        Class, score 0-100, a one-line reason without patient data, and the
        judgement of each finding.
    """
    order = order or OrderContext()
    judged = sorted(
        (_judge(r.model.name, f, policy) for r in model_results for f in r.findings),
        key=lambda f: (f.present, f.score),
        reverse=True,
    )
    priority_class, score = PriorityClassValues.ROUTINE, 0.0
    reasons: list[str] = []
    if judged:
        top = judged[0]
        priority_class, score = top.priority_class, top.score
        present = [f for f in judged if f.present]
        if present:
            reasons.extend(_describe(f) for f in present[:3])
            if len(present) > 3:
                reasons.append(f"{len(present) - 3} more finding(s) present")
        else:
            reasons.append(f"no finding above threshold (highest: {_describe(top)})")
    elif model_results:
        reasons.append("models reported no findings")
    else:
        reasons.append("no AI result")

    floors: list[tuple[PriorityClassValues, str]] = []
    order_priority = order.requested_procedure_priority
    if order_priority is RequestedProcedurePriorityValues.STAT:
        floors.append((PriorityClassValues.STAT, "order priority STAT"))
    elif order_priority is RequestedProcedurePriorityValues.HIGH:
        floors.append((PriorityClassValues.URGENT, "order priority HIGH"))
    if _contains_word(order.current_patient_location, policy.emergency_location_keywords):
        floors.append((PriorityClassValues.URGENT, "patient in emergency department"))
    keyword = _contains_word(order.reason_for_requested_procedure, policy.urgent_reason_keywords)
    if keyword:
        floors.append((PriorityClassValues.URGENT, f"order reason mentions {keyword.lower()}"))
    for floor_class, why in floors:
        floor_score = SCORE_BANDS[floor_class][0]
        if floor_class.rank > priority_class.rank or (
            floor_class is priority_class and floor_score > score
        ):
            priority_class, score = floor_class, floor_score
        reasons.append(why)
    return PriorityAssessment(
        priority_class=priority_class,
        score=round(score, 1),
        reason=f"{priority_class}: " + "; ".join(reasons),
        findings=tuple(judged),
    )


@dataclass(frozen=True)
class EffectivePriority:
    """Where a waiting study ranks now (see "Aging" in the module docstring).

    ``priority_class`` stays the assessed class (what the badge shows);
    ``effective_class`` is the band the aged score has reached.
    """

    priority_class: PriorityClassValues
    effective_class: PriorityClassValues
    score: float
    """Effective score: 0-100 before the cap, 100 + hours overdue after it."""
    waiting: timedelta
    overdue: bool

    @property
    def sort_key(self) -> tuple[float, float]:
        """Key for ``sorted(..., key=...)``: highest score first, then longest waiting."""
        return (-self.score, -self.waiting.total_seconds())


def effective_priority(
    priority_class: PriorityClassValues | str,
    score: float,
    arrived_at: datetime,
    now: datetime,
    policy: PriorityPolicy = DEFAULT_PRIORITY_POLICY,
) -> EffectivePriority:
    """Age a study's priority by its waiting time, so no study waits past its class cap.

    Parameters
    ----------
    priority_class : PriorityClassValues | str
        The assessed class.
    score : float
        The assessed score, 0-100.
    arrived_at : datetime
        When the study started waiting (became ready for reading).
    now : datetime
        The current time (a fake clock in tests); both datetimes must be
        timezone-aware or both naive.
    policy : PriorityPolicy
        Supplies the maximum wait per class.

    Returns
    -------
    EffectivePriority
        Effective score ``s + (100 - s) * min(w / cap, 1)``, or ``100 +
        hours overdue`` past the cap. A clock that runs backwards counts as
        no wait.

    Raises
    ------
    ValueError
        If `score` is outside [0, 100] or `priority_class` is unknown.
    TypeError
        If one datetime is timezone-aware and the other naive.
    """
    priority_class = PriorityClassValues(priority_class)
    if not 0.0 <= score <= 100.0:
        raise ValueError(f"score must lie in [0, 100], got {score}")
    if (arrived_at.tzinfo is None) != (now.tzinfo is None):
        raise TypeError("arrived_at and now must both be timezone-aware or both naive")
    waiting = max(now - arrived_at, timedelta(0))
    cap = policy.max_wait[priority_class]
    overdue = waiting > cap
    if overdue:
        effective = 100.0 + (waiting - cap).total_seconds() / 3600.0
    else:
        effective = score + (100.0 - score) * (waiting / cap)
    effective_class = next(
        c for c in PriorityClassValues if min(effective, 100.0) >= SCORE_BANDS[c][0]
    )
    if effective_class.rank < priority_class.rank:
        effective_class = priority_class
    return EffectivePriority(
        priority_class=priority_class,
        effective_class=effective_class,
        score=effective,
        waiting=waiting,
        overdue=overdue,
    )
