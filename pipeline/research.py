"""A research result as a DICOM Measurement Report, kept apart from the clinical triage report.

:func:`build_research_report` accepts what :func:`pipeline.report.build_measurement_report`
accepts for a completed analysis plus the name of the research cohort, and
produces the same TID 1500 Comprehensive 3D SR, but in a series of its own
(Series Number 9902, Series Description starting with ``RESEARCH``) with UIDs
derived from the study, the models and the cohort, and no triage priority.
A viewer thus shows it next to the images and never confuses it with the
clinical triage result; writing it twice for the same cohort gives the same
instance. Nothing here reads or writes files or talks to the archive.

References
----------
PS3.16 TID 1500, https://dicom.nema.org/medical/dicom/current/output/chtml/part16/chapter_A.html ;
PS3.3 C.7.3.1 General Series Module (Series Description),
https://dicom.nema.org/medical/dicom/current/output/chtml/part03/sect_C.7.3.html
"""

from __future__ import annotations

from collections.abc import Sequence

import pydicom
from pydicom.dataset import Dataset

from pipeline.findings import ModelResult
from pipeline.report import AnalysisOutcomeValues, build_measurement_report
from pipeline.uids import deterministic_uid, validate_uid

RESEARCH_SERIES_NUMBER = 9902
"""Series Number of research results (the clinical triage report series is 9901)."""
RESEARCH_SERIES_DESCRIPTION = "RESEARCH {cohort} - not for clinical use"
TRACKING_UNIQUE_IDENTIFIER = "112040"
"""DCM 112040 Tracking Unique Identifier (PS3.16 TID 4108)."""


def research_report_uids(
    study_instance_uid: str, model_results: Sequence[ModelResult], cohort_name: str
) -> tuple[str, str]:
    """Return (Series Instance UID, SOP Instance UID) of the research report of a cohort."""
    study_instance_uid = validate_uid(study_instance_uid, "StudyInstanceUID")
    models = ";".join(
        sorted(
            {f"{r.model.name} {r.model.version} {r.model.weights_sha256}" for r in model_results}
        )
    )
    series_instance_uid = deterministic_uid(study_instance_uid, "research report series")
    sop_instance_uid = deterministic_uid(study_instance_uid, "research report", cohort_name, models)
    return series_instance_uid, sop_instance_uid


def research_series_description(cohort_name: str) -> str:
    """Series Description (LO, at most 64 characters) marking the series as research."""
    return RESEARCH_SERIES_DESCRIPTION.format(cohort=cohort_name)[:64]


def _renumber_tracking_uids(items: Sequence[Dataset], salt: str) -> None:
    for item in items:
        concept = item.get("ConceptNameCodeSequence")
        if (
            item.get("ValueType") == "UIDREF"
            and concept
            and concept[0].CodeValue == TRACKING_UNIQUE_IDENTIFIER
        ):
            item.UID = deterministic_uid(str(item.UID), salt)
        if "ContentSequence" in item:
            _renumber_tracking_uids(item.ContentSequence, salt)


def build_research_report(
    source_images: Sequence[pydicom.Dataset],
    model_results: Sequence[ModelResult],
    *,
    cohort_name: str,
    software_versions: str | None = None,
) -> Dataset:
    """Build the research TID 1500 report of one study for one cohort.

    Parameters
    ----------
    source_images : Sequence[pydicom.Dataset]
        Headers of the analysed images (all of one study).
    model_results : Sequence[ModelResult]
        The cohort model's results on the study's series (at least one).
    cohort_name : str
        Named in the Series Description and part of the UIDs.
    software_versions : str | None
        Software Versions (0018,1020) of the writing node.

    Returns
    -------
    pydicom.dataset.Dataset
        The SR (a highdicom ``Comprehensive3DSR``), ready to be stored.

    Raises
    ------
    ValueError
        No model result, or what :func:`pipeline.report.build_measurement_report` refuses.
    """
    if not model_results:
        raise ValueError("model_results must hold at least one result for a research report")
    if not cohort_name:
        raise ValueError("cohort_name must not be empty")
    sr = build_measurement_report(
        source_images,
        model_results,
        priority=None,
        outcome=AnalysisOutcomeValues.COMPLETED,
        software_versions=software_versions,
    )
    series_instance_uid, sop_instance_uid = research_report_uids(
        str(sr.StudyInstanceUID), model_results, cohort_name
    )
    # The tracking UIDs derive from the triage report's UID; give the research
    # findings their own so the two documents never claim the same finding.
    _renumber_tracking_uids(sr.ContentSequence, sop_instance_uid)
    sr.SeriesInstanceUID = series_instance_uid
    sr.SOPInstanceUID = sop_instance_uid
    sr.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    sr.SeriesNumber = RESEARCH_SERIES_NUMBER
    sr.SeriesDescription = research_series_description(cohort_name)
    return sr
