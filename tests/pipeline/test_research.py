"""The research Measurement Report: its own series, marked as research, its own UIDs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from pipeline.findings import FindingDefinition, FindingResult, ModelIdentity, ModelResult
from pipeline.report import SR_SERIES_NUMBER, build_measurement_report
from pipeline.research import (
    RESEARCH_SERIES_NUMBER,
    TRACKING_UNIQUE_IDENTIFIER,
    build_research_report,
    research_report_uids,
)
from tests.dicom_factory import ct_dataset

HEMORRHAGE = FindingDefinition("hemorrhage", Code("50960005", "SCT", "Hemorrhage"), "critical", 0.5)
MODEL = ModelIdentity("ich", "2.0", "ab" * 32)


@pytest.fixture
def headers() -> list[pydicom.Dataset]:
    study, series = generate_uid(), generate_uid()
    return [
        ct_dataset(study_instance_uid=study, series_instance_uid=series, instance_number=n)
        for n in (1, 2, 3)
    ]


def result(headers: list[pydicom.Dataset], probability: float = 0.8) -> ModelResult:
    return ModelResult(
        MODEL, str(headers[0].SeriesInstanceUID), (FindingResult(HEMORRHAGE, probability),)
    )


def tracking_uids(items: pydicom.Sequence) -> list[str]:
    found = []
    for item in items:
        concept = item.get("ConceptNameCodeSequence")
        if concept and concept[0].CodeValue == TRACKING_UNIQUE_IDENTIFIER:
            found.append(str(item.UID))
        if "ContentSequence" in item:
            found.extend(tracking_uids(item.ContentSequence))
    return found


def numeric_values(items: pydicom.Sequence) -> list[float]:
    found = []
    for item in items:
        if item.get("ValueType") == "NUM":
            found.append(float(item.MeasuredValueSequence[0].NumericValue))
        if "ContentSequence" in item:
            found.extend(numeric_values(item.ContentSequence))
    return found


class TestResearchReport:
    def test_own_series_marked_research_and_not_the_triage_report(
        self, headers: list[pydicom.Dataset]
    ) -> None:
        triage = build_measurement_report(headers, [result(headers)])
        research = build_research_report(headers, [result(headers)], cohort_name="ich-2026")
        assert research.SeriesNumber == RESEARCH_SERIES_NUMBER != SR_SERIES_NUMBER
        assert research.SeriesDescription == "RESEARCH ich-2026 - not for clinical use"
        assert research.StudyInstanceUID == headers[0].StudyInstanceUID
        assert research.SeriesInstanceUID != triage.SeriesInstanceUID
        assert research.SOPInstanceUID != triage.SOPInstanceUID
        assert research.file_meta.MediaStorageSOPInstanceUID == research.SOPInstanceUID
        assert tracking_uids(research.ContentSequence)
        assert not set(tracking_uids(research.ContentSequence)) & set(
            tracking_uids(triage.ContentSequence)
        )
        # The finding's probability is in the report as a numeric measurement.
        assert 0.8 in numeric_values(research.ContentSequence)

    def test_same_cohort_same_uids_other_cohort_other_uids(
        self, headers: list[pydicom.Dataset]
    ) -> None:
        first = build_research_report(headers, [result(headers)], cohort_name="a")
        again = build_research_report(headers, [result(headers)], cohort_name="a")
        other = build_research_report(headers, [result(headers)], cohort_name="b")
        assert first.SOPInstanceUID == again.SOPInstanceUID != other.SOPInstanceUID
        assert first.SeriesInstanceUID == other.SeriesInstanceUID
        assert (first.SeriesInstanceUID, first.SOPInstanceUID) == research_report_uids(
            str(headers[0].StudyInstanceUID), [result(headers)], "a"
        )

    def test_long_cohort_name_fits_the_series_description(
        self, headers: list[pydicom.Dataset]
    ) -> None:
        sr = build_research_report(headers, [result(headers)], cohort_name="x" * 64)
        assert len(sr.SeriesDescription) == 64 and sr.SeriesDescription.startswith("RESEARCH x")

    def test_without_results_raises(self, headers: list[pydicom.Dataset]) -> None:
        with pytest.raises(ValueError, match="model_results must hold at least one result"):
            build_research_report(headers, [], cohort_name="a")

    def test_conforms_to_the_iod(self, headers: list[pydicom.Dataset], tmp_path: Path) -> None:
        dciodvfy = shutil.which("dciodvfy")
        if dciodvfy is None:
            pytest.fail("dciodvfy (dicom3tools) is not installed; run scripts/setup.sh")
        path = tmp_path / "research.dcm"
        build_research_report(headers, [result(headers)], cohort_name="a").save_as(
            path, enforce_file_format=True
        )
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in run.stderr.splitlines() if line.startswith("Error")]
        assert not errors, run.stderr
