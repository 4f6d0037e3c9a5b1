"""Tests for pipeline/report.py: the TID 1500 Measurement Report, read back and validated."""

from __future__ import annotations

import copy
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipeline import codes as triage_codes
from pipeline.findings import (
    FindingDefinition,
    FindingResult,
    ModelIdentity,
    ModelResult,
    SeverityValues,
)
from pipeline.priority import OrderContext, PriorityPolicy, assess_priority
from pipeline.report import (
    SR_SERIES_DESCRIPTION,
    AnalysisOutcomeValues,
    build_measurement_report,
    measurement_report_uids,
)
from tests.pipeline.support import shared_data

MASS = FindingDefinition("mass", Code("4147007", "SCT", "Mass"), SeverityValues.URGENT, 0.5)
HEMORRHAGE = FindingDefinition(
    "hemorrhage", Code("50960005", "SCT", "Hemorrhage"), SeverityValues.CRITICAL, 0.5
)
MODEL = ModelIdentity("demo-net", "1.2.0", "0123456789abcdef" * 4)
WHEN = datetime(2026, 3, 1, 12, 30, 0)

pytestmark = pytest.mark.filterwarnings(
    # The real CT's Patient's Name has one component; highdicom warns about it.
    "ignore:The string .* is unlikely to represent the intended person name:UserWarning"
)


def model_result(headers, mass_probability=0.8, **finding_kwargs) -> ModelResult:
    return ModelResult(
        model=MODEL,
        series_instance_uid=headers[0].SeriesInstanceUID,
        findings=(
            FindingResult(MASS, mass_probability, **finding_kwargs),
            FindingResult(HEMORRHAGE, 0.1),
        ),
    )


def write_and_validate(sr: pydicom.Dataset, path: Path) -> hd.sr.Comprehensive3DSR:
    """Save `sr`, require dciodvfy to pass, and read it back with highdicom."""
    sr.save_as(path, enforce_file_format=True)
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error")]
    assert run.returncode == 0 and not errors, run.stderr
    return hd.sr.srread(path)


def reread(sr: pydicom.Dataset) -> hd.sr.Comprehensive3DSR:
    """The SR as a reader sees it (highdicom parses the content tree)."""
    return hd.sr.Comprehensive3DSR.from_dataset(sr)


def qualitative_evaluations(sr: hd.sr.Comprehensive3DSR) -> dict[str, pydicom.Dataset]:
    root = sr.ContentSequence
    container = next(
        item
        for item in root
        if item.ConceptNameCodeSequence[0].CodeValue == triage_codes.QUALITATIVE_EVALUATIONS.value
    )
    return {item.ConceptNameCodeSequence[0].CodeValue: item for item in container.ContentSequence}


class TestBuildMeasurementReport:
    def test_report_reads_back_with_measurement_groups(self, ct_headers, tmp_path):
        key = ct_headers[40]
        result = model_result(
            ct_headers,
            volume_ml=12.5,
            location=(-10.0, 20.0, 300.0),
            key_sop_instance_uid=key.SOPInstanceUID,
        )
        priority = assess_priority([result], OrderContext("HIGH"))
        sr = write_and_validate(
            build_measurement_report(
                ct_headers, [result], priority=priority, content_datetime=WHEN
            ),
            tmp_path / "sr.dcm",
        )
        groups = sr.content.get_image_measurement_groups()
        assert [g.finding_type for g in groups] == [MASS.concept, HEMORRHAGE.concept]
        mass, hemorrhage = groups
        (probability,) = mass.get_measurements(name=triage_codes.AI_FINDING_PROBABILITY)
        assert probability.value == pytest.approx(0.8)
        assert probability.unit == codes.UCUM.NoUnits
        (coordinates,) = probability.referenced_coordinates
        assert coordinates.value.tolist() == [[-10.0, 20.0, 300.0]]
        assert coordinates.ReferencedFrameOfReferenceUID == key.FrameOfReferenceUID
        (volume,) = mass.get_measurements(name=codes.SCT.Volume)
        assert (volume.value, volume.unit.value) == (pytest.approx(12.5), "ml")
        (evaluation,) = mass.get_qualitative_evaluations(name=MASS.concept)
        assert evaluation.value == codes.SCT.Present
        assert hemorrhage.get_qualitative_evaluations()[0].value == codes.SCT.Absent
        assert [s.referenced_sop_instance_uid for s in mass.source_images] == [key.SOPInstanceUID]
        assert mass.tracking_identifier == "demo-net mass"

    def test_algorithm_identification_names_model_version_and_weights(self, ct_headers, tmp_path):
        sr = write_and_validate(
            build_measurement_report(ct_headers, [model_result(ct_headers)]),
            tmp_path / "sr.dcm",
        )
        group = sr.content.get_image_measurement_groups()[0]
        items = {
            item.ConceptNameCodeSequence[0].CodeValue: item.TextValue
            for item in group[0].ContentSequence
            if item.ValueType == "TEXT"
        }
        assert items[codes.DCM.AlgorithmName.value] == "demo-net"
        assert items[codes.DCM.AlgorithmVersion.value] == "1.2.0"
        weights = items[codes.DCM.AlgorithmParameters.value]
        assert weights == f"weights_sha256={MODEL.weights_sha256}"

    def test_document_attributes(self, ct_headers, tmp_path):
        priority = assess_priority([model_result(ct_headers)])
        sr = write_and_validate(
            build_measurement_report(
                ct_headers,
                [model_result(ct_headers)],
                priority=priority,
                generation=2,
                content_datetime=WHEN,
            ),
            tmp_path / "sr.dcm",
        )
        source = ct_headers[0]
        assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID
        assert sr.PatientID == source.PatientID
        assert sr.CompletionFlag == "COMPLETE"
        assert sr.VerificationFlag == "UNVERIFIED"
        assert sr.SeriesDescription == SR_SERIES_DESCRIPTION
        assert "not for diagnosis" in sr.SeriesDescription
        assert sr.InstanceNumber == 2
        assert (sr.ContentDate, sr.ContentTime[:6]) == ("20260301", "123000")
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence
        assert {r.ReferencedSOPInstanceUID for r in referenced} == {
            ds.SOPInstanceUID for ds in ct_headers
        }
        assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99PACSTRIAGE"
        evaluations = qualitative_evaluations(sr)
        assert evaluations["TRIAGEPRIO"].ConceptCodeSequence[0].CodeValue == "URGENT"
        assert evaluations["AIOUTCOME"].ConceptCodeSequence[0].CodeValue == "AIDONE"

    def test_presence_follows_site_thresholds(self, ct_headers):
        result = model_result(ct_headers, mass_probability=0.6)
        priority = assess_priority(
            [result], policy=PriorityPolicy(threshold_overrides={"mass": 0.7})
        )
        sr = reread(build_measurement_report(ct_headers, [result], priority=priority))
        group = sr.content.get_image_measurement_groups()[0]
        assert group.get_qualitative_evaluations()[0].value == codes.SCT.Absent

    def test_same_inputs_give_same_uids(self, ct_headers):
        first = build_measurement_report(ct_headers, [model_result(ct_headers)])
        again = build_measurement_report(ct_headers, [model_result(ct_headers, 0.9)])
        newer = build_measurement_report(ct_headers, [model_result(ct_headers)], generation=2)
        assert first.SOPInstanceUID == again.SOPInstanceUID
        assert first.SeriesInstanceUID == again.SeriesInstanceUID == newer.SeriesInstanceUID
        assert newer.SOPInstanceUID != first.SOPInstanceUID
        assert (first.SeriesInstanceUID, first.SOPInstanceUID) == measurement_report_uids(
            ct_headers[0].StudyInstanceUID, [model_result(ct_headers)]
        )

    def test_caller_headers_are_not_modified(self, ct_headers):
        header = pydicom.dcmread(
            pydicom.data.get_testdata_file("CT_small.dcm"), stop_before_pixels=True
        )
        del header.StudyID
        build_measurement_report(
            [header],
            [ModelResult(MODEL, header.SeriesInstanceUID, (FindingResult(MASS, 0.9),))],
        )
        assert "StudyID" not in header

    def test_build_time_is_tens_of_milliseconds(self, ct_headers):
        result = model_result(ct_headers, key_sop_instance_uid=ct_headers[3].SOPInstanceUID)
        build_measurement_report(ct_headers, [result])
        timings = []
        for _ in range(5):
            start = time.perf_counter()
            build_measurement_report(ct_headers, [result])
            timings.append(time.perf_counter() - start)
        assert min(timings) < 0.25  # measured ~50-90 ms on 2 shared cores


class TestMeasurementReportWithoutFindings:
    def test_no_applicable_model_gives_valid_sr(self, ct_headers, tmp_path):
        sr = write_and_validate(
            build_measurement_report(
                ct_headers, [], outcome=AnalysisOutcomeValues.NO_APPLICABLE_MODEL
            ),
            tmp_path / "sr.dcm",
        )
        assert sr.CompletionFlag == "COMPLETE"
        assert sr.content.get_image_measurement_groups() == []
        evaluations = qualitative_evaluations(sr)
        assert evaluations["AIOUTCOME"].ConceptCodeSequence[0].CodeValue == "AINOMODEL"

    def test_failed_analysis_gives_partial_sr_with_reason(self, ct_headers, tmp_path):
        priority = assess_priority([], OrderContext("STAT"))
        sr = write_and_validate(
            build_measurement_report(
                ct_headers,
                [],
                priority=priority,
                outcome="failed",
                failure_reason="irregular slice spacing (missing slices?)",
            ),
            tmp_path / "sr.dcm",
        )
        assert sr.CompletionFlag == "PARTIAL"
        evaluations = qualitative_evaluations(sr)
        assert evaluations["AIOUTCOME"].ConceptCodeSequence[0].CodeValue == "AIFAILED"
        assert evaluations["AIFAILREASON"].TextValue == "irregular slice spacing (missing slices?)"
        assert evaluations["TRIAGEPRIO"].ConceptCodeSequence[0].CodeValue == "STAT"

    def test_partial_failure_keeps_successful_results(self, ct_headers):
        sr = build_measurement_report(
            ct_headers,
            [model_result(ct_headers)],
            outcome="failed",
            failure_reason="model other-net raised RuntimeError",
        )
        assert sr.CompletionFlag == "PARTIAL"
        assert len(reread(sr).content.get_image_measurement_groups()) == 2

    def test_other_outcomes_get_other_uids(self, ct_headers):
        failed = build_measurement_report(ct_headers, [], outcome="failed", failure_reason="x")
        none = build_measurement_report(ct_headers, [], outcome="no_applicable_model")
        assert failed.SOPInstanceUID != none.SOPInstanceUID


class TestMeasurementReportErrors:
    def test_report_without_evidence_raises(self):
        with pytest.raises(ValueError, match="source_images must hold at least one image header"):
            build_measurement_report([], [], outcome="no_applicable_model")

    def test_images_of_two_studies_raise(self, ct_headers):
        other = copy.deepcopy(ct_headers[1])
        other.StudyInstanceUID = "1.2.3.4"
        with pytest.raises(ValueError, match="belong to 2 studies"):
            build_measurement_report([ct_headers[0], other], [], outcome="no_applicable_model")

    def test_result_for_unknown_series_raises(self, ct_headers):
        result = ModelResult(MODEL, "1.2.3.4.5", (FindingResult(MASS, 0.9),))
        with pytest.raises(ValueError, match=r"series 1\.2\.3\.4\.5, which is not among"):
            build_measurement_report(ct_headers, [result])

    def test_unknown_key_image_raises(self, ct_headers):
        result = model_result(ct_headers, key_sop_instance_uid="1.2.3.4.5")
        with pytest.raises(ValueError, match=r"key image 1\.2\.3\.4\.5, which is not among"):
            build_measurement_report(ct_headers, [result])

    def test_location_without_frame_of_reference_raises(self):
        header = pydicom.dcmread(
            shared_data("sr-seg", "highdicom", "dx_image.dcm"), stop_before_pixels=True
        )
        result = ModelResult(
            MODEL, header.SeriesInstanceUID, (FindingResult(MASS, 0.9, location=(0, 0, 0)),)
        )
        with pytest.raises(ValueError, match="has no Frame of Reference UID"):
            build_measurement_report([header], [result])

    def test_completed_without_results_raises(self, ct_headers):
        with pytest.raises(ValueError, match="outcome COMPLETED needs at least one model result"):
            build_measurement_report(ct_headers, [])

    def test_failed_without_reason_raises(self, ct_headers):
        with pytest.raises(ValueError, match="outcome FAILED needs a failure_reason"):
            build_measurement_report(ct_headers, [], outcome="failed")

    def test_reason_without_failure_raises(self, ct_headers):
        with pytest.raises(ValueError, match="failure_reason is only written for outcome FAILED"):
            build_measurement_report(
                ct_headers, [model_result(ct_headers)], failure_reason="nothing wrong"
            )

    def test_invalid_source_uid_raises(self, ct_headers):
        bad = copy.deepcopy(ct_headers[0])
        with pytest.warns(UserWarning, match="Invalid value for VR UI"):
            bad.SOPInstanceUID = "1.2.abc"
        with pytest.raises(ValueError, match="SOPInstanceUID contains characters other than"):
            build_measurement_report([bad], [], outcome="no_applicable_model")
