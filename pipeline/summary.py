"""The AI result read back from a TID 1500 Measurement Report, for display and alerts.

Accepts a Comprehensive 3D SR as :func:`pipeline.report.build_measurement_report`
writes it (any TID 1500 report with image measurement groups is understood)
and produces a :class:`ReportSummary`: per measurement group the finding, its
probability, whether it was judged present, the model and the key image; and
the study-level analysis outcome, triage priority and failure reason. It is
what the worklist shows and what an alert says. Nothing here reads files;
patient data of the SR is never copied into the summary.

References
----------
PS3.16 TID 1500 / TID 1501, https://dicom.nema.org/medical/dicom/current/output/chtml/part16/chapter_A.html
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from pipeline import codes as triage_codes


@dataclass(frozen=True)
class SummaryFinding:
    """One finding of one model, as the report states it."""

    finding: str
    """The finding's CodeMeaning (e.g. "Intracranial hemorrhage")."""
    code: str
    """``<CodingSchemeDesignator>:<CodeValue>`` of the finding."""
    probability: float | None
    present: bool
    model: str
    model_version: str
    key_sop_instance_uid: str | None = None
    key_sop_class_uid: str | None = None
    volume_ml: float | None = None
    location: tuple[float, float, float] | None = None
    """Centroid in patient coordinates (mm) from the SCOORD3D POINT, if any."""


@dataclass(frozen=True)
class ReportSummary:
    """What an AI report says, in the words the worklist shows."""

    sop_instance_uid: str
    outcome: str | None
    """CodeMeaning of "AI analysis outcome" (completed / no applicable model / failed)."""
    priority_class: str | None
    failure_reason: str | None
    findings: tuple[SummaryFinding, ...] = field(default_factory=tuple)

    @property
    def present_findings(self) -> tuple[SummaryFinding, ...]:
        """Findings judged present, most probable first."""
        return tuple(
            sorted(
                (f for f in self.findings if f.present),
                key=lambda f: -(f.probability or 0.0),
            )
        )

    @property
    def headline(self) -> str:
        """One line for the worklist: the present findings, or why there are none."""
        present = self.present_findings
        if present:
            return "; ".join(
                f"{f.finding}" + (f" (p={f.probability:.2f})" if f.probability is not None else "")
                for f in present
            )
        if self.failure_reason:
            return f"AI could not analyse this study: {self.failure_reason}"
        if self.outcome and "no applicable" in self.outcome.lower():
            return "No applicable AI model"
        if self.findings:
            return "No finding above threshold"
        return self.outcome or "No AI result"

    def as_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for the index and the API)."""
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "outcome": self.outcome,
            "priority_class": self.priority_class,
            "failure_reason": self.failure_reason,
            "headline": self.headline,
            "findings": [asdict(f) for f in self.findings],
        }


def _code_key(code: Any) -> str:
    return f"{code.scheme_designator}:{code.value}"


def _text_of(item: pydicom.Dataset) -> str | None:
    return str(item.TextValue) if "TextValue" in item else None


def _algorithm(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> tuple[str, str]:
    # PS3.16 TID 4019 Algorithm Identification: (DCM 111001) name, (DCM 111003) version;
    # highdicom attaches it to the group or to a descendant item, so search the subtree.
    found: dict[str, str] = {}
    wanted = {codes.DCM.AlgorithmName.value, codes.DCM.AlgorithmVersion.value}
    stack = list(group)
    while stack:
        item = stack.pop(0)
        concept = (
            item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else None
        )
        if concept in wanted and concept not in found and _text_of(item):
            found[concept] = str(_text_of(item))
        stack.extend(item.get("ContentSequence", []))
    name = found.get(codes.DCM.AlgorithmName.value, "")
    version = found.get(codes.DCM.AlgorithmVersion.value, "")
    if not name:
        name = str(group.tracking_identifier or "").split(" ", 1)[0]
    return name, version


def _finding(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> SummaryFinding:
    finding_type = group.finding_type
    probability = None
    location = None
    for measurement in group.get_measurements(name=triage_codes.AI_FINDING_PROBABILITY):
        probability = float(measurement.value)
        coordinates = measurement.referenced_coordinates
        if coordinates:
            point = coordinates[0].value
            if len(point) == 1 and len(point[0]) == 3:
                location = (float(point[0][0]), float(point[0][1]), float(point[0][2]))
    volume = None
    for measurement in group.get_measurements(name=codes.SCT.Volume):
        volume = float(measurement.value)
    evaluations = group.get_qualitative_evaluations(name=finding_type)
    present = bool(evaluations) and evaluations[0].value == codes.SCT.Present
    source = group.source_images
    model, version = _algorithm(group)
    return SummaryFinding(
        finding=str(finding_type.meaning),
        code=_code_key(finding_type),
        probability=probability,
        present=present,
        model=model,
        model_version=version,
        key_sop_instance_uid=source[0].referenced_sop_instance_uid if source else None,
        key_sop_class_uid=source[0].referenced_sop_class_uid if source else None,
        volume_ml=volume,
        location=location,
    )


def summarize_report(ds: pydicom.Dataset) -> ReportSummary:
    """Read a TID 1500 report's findings and study-level evaluations.

    Parameters
    ----------
    ds : pydicom.Dataset
        A Comprehensive 3D SR (or Enhanced/Comprehensive SR) with TID 1500 content.

    Returns
    -------
    ReportSummary

    Raises
    ------
    ValueError
        If `ds` is not a TID 1500 Imaging Measurement Report.
    """
    root_name = ds.get("ConceptNameCodeSequence")
    if not root_name or root_name[0].CodeValue != codes.DCM.ImagingMeasurementReport.value:
        raise ValueError("dataset is not a TID 1500 Imaging Measurement Report")
    outcome = priority = reason = None
    for item in ds.get("ContentSequence", []):
        name = item.ConceptNameCodeSequence[0].CodeValue
        if name != triage_codes.QUALITATIVE_EVALUATIONS.value:
            continue
        for evaluation in item.get("ContentSequence", []):
            concept = evaluation.ConceptNameCodeSequence[0].CodeValue
            if concept == triage_codes.AI_ANALYSIS_OUTCOME.value:
                outcome = str(evaluation.ConceptCodeSequence[0].CodeMeaning)
            elif concept == triage_codes.TRIAGE_PRIORITY.value:
                priority = str(evaluation.ConceptCodeSequence[0].CodeValue)
            elif concept == triage_codes.AI_ANALYSIS_FAILURE_REASON.value:
                reason = _text_of(evaluation)
    findings: tuple[SummaryFinding, ...] = ()
    has_groups = any(
        item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurements.value
        for item in ds.get("ContentSequence", [])
    )
    if has_groups:
        sr = hd.sr.Comprehensive3DSR.from_dataset(ds, copy=True)
        findings = tuple(_finding(g) for g in sr.content.get_image_measurement_groups())
    return ReportSummary(
        sop_instance_uid=str(ds.SOPInstanceUID),
        outcome=outcome,
        priority_class=priority,
        failure_reason=reason,
        findings=findings,
    )
