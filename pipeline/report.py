"""The AI result as a DICOM Measurement Report (TID 1500) in a Comprehensive 3D SR.

:func:`build_measurement_report` accepts the headers of the analysed images
(datasets without pixel data), the :class:`~pipeline.findings.ModelResult`
objects, the :class:`~pipeline.priority.PriorityAssessment` and the outcome
of the analysis, and produces a highdicom ``Comprehensive3DSR`` laid out as
IHE AI Results (AIR) describes:

- root: TID 1500 "Imaging Measurement Report"; observer is the device
  pacs-triage; procedure reported "Imaging procedure";
- one TID 1501 measurement group per finding per model: tracking identifier,
  the finding (DCM 121071 "Finding"), algorithm identification (TID 4019:
  model name, version, and ``weights_sha256=...`` as algorithm parameter),
  the finding as a qualitative evaluation (finding concept = SCT Present /
  Absent, judged with the site's thresholds), the probability as a numeric
  measurement (99PACSTRIAGE "AI finding probability", UCUM "1"), the lesion
  volume (SCT "Volume", UCUM "ml") and the location (SCOORD3D POINT in the
  series' Frame of Reference, attached to the probability) where given, and
  the key image as the group's source image;
- a TID 1500 "Qualitative Evaluations" container with the study-level
  "Triage priority" (STAT / URGENT / ROUTINE), the "AI analysis outcome"
  and, when the analysis failed, the reason as text. A study that no model
  applies to, or whose analysis failed, gets an SR with only this container,
  so a viewer shows that the AI did not (fully) analyse it.

The SR belongs to the source study, in a series of its own ("AI triage result
- not for diagnosis without review"), Completion Flag COMPLETE (PARTIAL when
the analysis failed), Verification Flag UNVERIFIED. Its UIDs are derived from
the study, the models and the analysis generation (:func:`measurement_report_uids`),
so building it twice gives the same instance. Nothing here reads or writes
files or talks to the archive.

References
----------
PS3.16 TID 1500, TID 1501, TID 4019,
https://dicom.nema.org/medical/dicom/current/output/chtml/part16/chapter_A.html ;
PS3.3 A.35.13 Comprehensive 3D SR IOD and C.17.2 SR Document General Module,
https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_C.17.2.html ;
IHE Radiology AI Results (AIR) Trial Implementation,
https://www.ihe.net/uploadedFiles/Documents/Radiology/IHE_RAD_Suppl_AIR.pdf
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from enum import StrEnum

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    Comprehensive3DSR,
    ContainerContentItem,
    CoordinatesForMeasurement3D,
    DeviceObserverIdentifyingAttributes,
    LanguageOfContentItemAndDescendants,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom.sr.codedict import codes

from pipeline import codes as triage_codes
from pipeline.findings import FindingResult, ModelResult
from pipeline.priority import PriorityAssessment
from pipeline.uids import deterministic_uid, validate_uid

MANUFACTURER = "pacs-triage"
SR_SERIES_NUMBER = 9901
"""Series Number of the AI result series (one per study, all generations)."""
SR_SERIES_DESCRIPTION = "AI triage result - not for diagnosis without review"
DEVICE_OBSERVER_UID = deterministic_uid("pacs-triage", "device observer")
"""Device Observer UID of pacs-triage (the same on every node)."""


class AnalysisOutcomeValues(StrEnum):
    """How the AI analysis of a study ended (the study's visible state)."""

    COMPLETED = "completed"
    """Every applicable model ran; the SR holds their findings."""
    NO_APPLICABLE_MODEL = "no_applicable_model"
    """No model applies to any series of the study."""
    FAILED = "failed"
    """Loading or inference failed (for some models at least); the reason is given."""


_OUTCOME_CODES = {
    AnalysisOutcomeValues.COMPLETED: triage_codes.AI_ANALYSIS_COMPLETED,
    AnalysisOutcomeValues.NO_APPLICABLE_MODEL: triage_codes.NO_APPLICABLE_MODEL,
    AnalysisOutcomeValues.FAILED: triage_codes.AI_ANALYSIS_FAILED,
}


def _models_key(model_results: Sequence[ModelResult]) -> str:
    return ";".join(sorted({f"{r.model.name} {r.model.version}" for r in model_results}))


def measurement_report_uids(
    study_instance_uid: str,
    model_results: Sequence[ModelResult],
    outcome: AnalysisOutcomeValues | str = AnalysisOutcomeValues.COMPLETED,
    generation: int = 1,
) -> tuple[str, str]:
    """Return (Series Instance UID, SOP Instance UID) of the report for these inputs.

    The series is one per study (every AI report of the study lies in it); the
    instance depends on the study, the set of models (name and version), the
    outcome and the analysis generation. The flow may call this to see whether
    the report is already stored before building it.
    """
    study_instance_uid = validate_uid(study_instance_uid, "StudyInstanceUID")
    outcome = AnalysisOutcomeValues(outcome)
    series_instance_uid = deterministic_uid(study_instance_uid, "measurement report series")
    sop_instance_uid = deterministic_uid(
        study_instance_uid,
        "measurement report",
        _models_key(model_results),
        outcome.value,
        generation,
    )
    return series_instance_uid, sop_instance_uid


def build_measurement_report(
    source_images: Sequence[pydicom.Dataset],
    model_results: Sequence[ModelResult],
    *,
    priority: PriorityAssessment | None = None,
    outcome: AnalysisOutcomeValues | str = AnalysisOutcomeValues.COMPLETED,
    failure_reason: str | None = None,
    generation: int = 1,
    content_datetime: datetime.datetime | None = None,
    software_versions: str | None = None,
) -> Comprehensive3DSR:
    """Build the TID 1500 Measurement Report of one study's AI analysis.

    Parameters
    ----------
    source_images : Sequence[pydicom.Dataset]
        Headers (no pixel data needed) of the images the models analysed, all of
        one study; they become the SR's evidence and give it patient and study.
    model_results : Sequence[ModelResult]
        What each model found; empty when no model applies or all failed.
    priority : PriorityAssessment | None
        The triage decision; its per-finding judgement decides present/absent
        (else each finding's own threshold does), its class is written as
        "Triage priority".
    outcome : AnalysisOutcomeValues | str
        How the analysis ended.
    failure_reason : str | None
        Why it failed; required with ``FAILED``, refused otherwise. Must not hold
        patient data (it is written into the SR).
    generation : int
        Analysis generation of the study (1, then 2 after a re-analysis...);
        becomes the Instance Number and part of the SOP Instance UID.
    content_datetime : datetime.datetime | None
        Content Date/Time; now when None.
    software_versions : str | None
        Software Versions (0018,1020) of the writing node.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The SR, ready to be stored (Explicit VR Little Endian).

    Raises
    ------
    ValueError
        No source images, images of several studies, a model result whose
        series or key image is not among the source images, a location without
        a Frame of Reference, an outcome that contradicts the results, or a
        missing failure reason.

    References
    ----------
    PS3.16 TID 1500 / 1501, https://dicom.nema.org/medical/dicom/current/output/chtml/part16/chapter_A.html
    """
    outcome = AnalysisOutcomeValues(outcome)
    evidence = _check_source_images(source_images)
    _check_outcome(outcome, model_results, failure_reason, generation)
    sop_class_by_uid = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in source_images}
    frame_of_reference = _frame_of_reference_by_series(source_images)
    study_instance_uid = str(evidence[0].StudyInstanceUID)
    series_instance_uid, sop_instance_uid = measurement_report_uids(
        study_instance_uid, model_results, outcome, generation
    )

    judged = _presence_by_finding(priority)
    groups = [
        _measurement_group(
            result, finding, sop_instance_uid, sop_class_by_uid, frame_of_reference, judged
        )
        for result in model_results
        for finding in result.findings
    ]
    content = _report_content(groups, priority, outcome, failure_reason)

    now = content_datetime or datetime.datetime.now()
    sr = Comprehensive3DSR(
        evidence=evidence,
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=generation,
        manufacturer=MANUFACTURER,
        is_complete=outcome is not AnalysisOutcomeValues.FAILED,
        is_final=False,
        is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
        software_versions=software_versions,
        coding_schemes=[triage_codes.coding_scheme_identification()],
        content_date=now.date(),
        content_time=now.time(),
        series_date=now.date(),
        series_time=now.time(),
    )
    return sr


_REFERENCE_TAGS = (
    pydicom.tag.Tag("StudyInstanceUID"),
    pydicom.tag.Tag("SeriesInstanceUID"),
    pydicom.tag.Tag("SOPClassUID"),
    pydicom.tag.Tag("SOPInstanceUID"),
)


def _check_source_images(source_images: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Validate the headers; return evidence safe to hand to highdicom (no caller mutation)."""
    if len(source_images) == 0:
        raise ValueError(
            "source_images must hold at least one image header: the SR needs evidence "
            "(the images it describes) and takes patient and study from it"
        )
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        for ds in source_images:
            validate_uid(ds.get(keyword), keyword)
    studies = {str(ds.StudyInstanceUID) for ds in source_images}
    if len(studies) > 1:
        raise ValueError(
            f"source_images belong to {len(studies)} studies; an SR describes one study"
        )
    # highdicom takes patient and study from the first image and reads these
    # Type 2 attributes unconditionally: tolerate imperfect modality data with
    # a new dataset with the same elements that gets empty values (copy.copy
    # of a Dataset would share its element dict with the caller's). The other
    # images only need to be referenced: they travel as four UIDs each, which
    # highdicom collects much faster than whole headers.
    first = pydicom.Dataset()
    for element in source_images[0]:
        first.add(element)
    for keyword in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
    ):
        if keyword not in first:
            setattr(first, keyword, None)
    references = []
    for ds in source_images[1:]:
        reference = pydicom.Dataset()
        for tag in _REFERENCE_TAGS:
            reference[tag] = ds[tag]  # the element itself: no re-validation, no copy
        references.append(reference)
    return [first, *references]


def _check_outcome(
    outcome: AnalysisOutcomeValues,
    model_results: Sequence[ModelResult],
    failure_reason: str | None,
    generation: int,
) -> None:
    if int(generation) < 1:
        raise ValueError(f"generation must be 1 or more, got {generation}")
    if outcome is AnalysisOutcomeValues.COMPLETED and not model_results:
        raise ValueError(
            "outcome COMPLETED needs at least one model result; use NO_APPLICABLE_MODEL or FAILED"
        )
    if outcome is AnalysisOutcomeValues.NO_APPLICABLE_MODEL and model_results:
        raise ValueError("outcome NO_APPLICABLE_MODEL contradicts the model results given")
    if outcome is AnalysisOutcomeValues.FAILED:
        if not failure_reason or not failure_reason.strip():
            raise ValueError("outcome FAILED needs a failure_reason")
        if len(failure_reason) > 1024:
            raise ValueError("failure_reason must be at most 1024 characters")
    elif failure_reason:
        raise ValueError(f"failure_reason is only written for outcome FAILED, not {outcome}")


def _frame_of_reference_by_series(
    source_images: Sequence[pydicom.Dataset],
) -> dict[str, str | None]:
    """Series Instance UID -> Frame of Reference UID (None where the series has none)."""
    frames: dict[str, str | None] = {}
    for ds in source_images:
        series = str(ds.SeriesInstanceUID)
        value = ds.get("FrameOfReferenceUID")
        if frames.get(series) is None:
            frames[series] = str(value) if value else None
    return frames


def _presence_by_finding(priority: PriorityAssessment | None) -> dict[int, bool]:
    if priority is None:
        return {}
    return {id(f.result): f.present for f in priority.findings}


def _measurement_group(
    result: ModelResult,
    finding: FindingResult,
    report_uid: str,
    sop_class_by_uid: dict[str, str],
    frame_of_reference: dict[str, str | None],
    judged: dict[int, bool],
) -> MeasurementsAndQualitativeEvaluations:
    model = result.model
    definition = finding.definition
    if result.series_instance_uid not in frame_of_reference:
        raise ValueError(
            f"model {model.name!r} reports on series {result.series_instance_uid}, "
            "which is not among the source images"
        )
    present = judged.get(id(finding), finding.present)

    coordinates = None
    if finding.location is not None:
        frame_uid = frame_of_reference.get(result.series_instance_uid)
        if frame_uid is None:
            raise ValueError(
                f"finding {definition.key!r} has a location, but series "
                f"{result.series_instance_uid} has no Frame of Reference UID to anchor it"
            )
        # PS3.16 TID 300 / TID 320: where the measurement was made, in patient mm.
        coordinates = [
            CoordinatesForMeasurement3D(
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=np.asarray([finding.location], dtype=float),
                frame_of_reference_uid=frame_uid,
            )
        ]
    measurements = [
        Measurement(
            name=triage_codes.AI_FINDING_PROBABILITY,
            value=float(finding.probability),
            unit=codes.UCUM.NoUnits,
            referenced_coordinates=coordinates,
        )
    ]
    if finding.volume_ml is not None:
        measurements.append(
            Measurement(
                name=codes.SCT.Volume, value=float(finding.volume_ml), unit=triage_codes.MILLILITER
            )
        )

    source_images = None
    if finding.key_sop_instance_uid is not None:
        sop_class_uid = sop_class_by_uid.get(finding.key_sop_instance_uid)
        if sop_class_uid is None:
            raise ValueError(
                f"finding {definition.key!r} names key image {finding.key_sop_instance_uid}, "
                "which is not among the source images"
            )
        source_images = [
            SourceImageForMeasurementGroup(sop_class_uid, finding.key_sop_instance_uid)
        ]

    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            identifier=f"{model.name} {definition.key}"[:64],
            uid=deterministic_uid(
                report_uid, model.name, model.version, result.series_instance_uid, definition.key
            ),
        ),
        finding_type=definition.concept,
        algorithm_id=AlgorithmIdentification(
            name=model.name,
            version=model.version,
            parameters=[f"weights_sha256={model.weights_sha256}"],
        ),
        measurements=measurements,
        qualitative_evaluations=[
            QualitativeEvaluation(
                name=definition.concept, value=codes.SCT.Present if present else codes.SCT.Absent
            )
        ],
        source_images=source_images,
    )


def _observation_context() -> ObservationContext:
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=DEVICE_OBSERVER_UID,
                name=MANUFACTURER,
                manufacturer_name=MANUFACTURER,
            ),
        )
    )


def _qualitative_evaluations(
    priority: PriorityAssessment | None,
    outcome: AnalysisOutcomeValues,
    failure_reason: str | None,
) -> ContainerContentItem:
    # PS3.16 TID 1500 "Qualitative Evaluations": study-level CODE and TEXT items.
    container = ContainerContentItem(
        name=triage_codes.QUALITATIVE_EVALUATIONS,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    items = [
        CodeContentItem(
            name=triage_codes.AI_ANALYSIS_OUTCOME,
            value=_OUTCOME_CODES[outcome],
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    ]
    if priority is not None:
        items.append(
            CodeContentItem(
                name=triage_codes.TRIAGE_PRIORITY,
                value=triage_codes.priority_class_code(priority.priority_class),
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        )
    if failure_reason:
        items.append(
            TextContentItem(
                name=triage_codes.AI_ANALYSIS_FAILURE_REASON,
                value=failure_reason.strip(),
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        )
    container.ContentSequence = items
    return container


def _report_content(
    groups: Sequence[MeasurementsAndQualitativeEvaluations],
    priority: PriorityAssessment | None,
    outcome: AnalysisOutcomeValues,
    failure_reason: str | None,
) -> pydicom.Dataset:
    evaluations = _qualitative_evaluations(priority, outcome, failure_reason)
    if groups:
        report = MeasurementReport(
            observation_context=_observation_context(),
            procedure_reported=codes.SCT.ImagingProcedure,
            imaging_measurements=groups,
        )
        root = report[0]
        root.ContentSequence.append(evaluations)
        return root
    # highdicom's MeasurementReport insists on measurement groups; TID 1500
    # only needs one of Imaging Measurements or Qualitative Evaluations, so
    # the root is assembled from the same highdicom content items.
    root = ContainerContentItem(name=codes.DCM.ImagingMeasurementReport, template_id="1500")
    content = hd.sr.ContentSequence()
    content.extend(LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    content.extend(_observation_context())
    content.append(
        CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=codes.SCT.ImagingProcedure,
            relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    content.append(evaluations)
    root.ContentSequence = content
    return root
