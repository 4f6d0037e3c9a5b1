"""Tests for pipeline/summary.py: the worklist's reading of a TID 1500 report."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.sr.coding import Code

from pipeline.findings import (
    FindingDefinition,
    FindingResult,
    ModelIdentity,
    ModelResult,
    SeverityValues,
)
from pipeline.priority import assess_priority
from pipeline.report import AnalysisOutcomeValues, build_measurement_report
from pipeline.summary import summarize_report

HEMORRHAGE = FindingDefinition(
    "hemorrhage", Code("50960005", "SCT", "Hemorrhage"), SeverityValues.CRITICAL, 0.5
)
MASS = FindingDefinition("mass", Code("4147007", "SCT", "Mass"), SeverityValues.URGENT, 0.5)
MODEL = ModelIdentity("demo-net", "1.2.0", "0123456789abcdef" * 4)


def headers(series) -> list[pydicom.Dataset]:  # type: ignore[no-untyped-def]
    result = []
    for ds in series:
        copy = pydicom.Dataset(ds)
        del copy.PixelData
        copy.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
        result.append(copy)
    return result


class TestSummarizeReport:
    def test_findings_model_key_image_and_location_read_back(self, synthetic_series) -> None:
        images = headers(synthetic_series(5))
        key = images[2]
        result = ModelResult(
            MODEL,
            str(key.SeriesInstanceUID),
            (
                FindingResult(
                    HEMORRHAGE,
                    0.93,
                    volume_ml=3.5,
                    location=(1.0, 2.0, 15.0),
                    key_sop_instance_uid=str(key.SOPInstanceUID),
                ),
                FindingResult(MASS, 0.1),
            ),
        )
        sr = build_measurement_report(images, [result], priority=assess_priority([result]))

        summary = summarize_report(sr)

        assert summary.sop_instance_uid == sr.SOPInstanceUID
        assert summary.priority_class == "STAT"
        assert summary.outcome == "AI analysis completed"
        bleed, mass = summary.findings
        assert (bleed.finding, bleed.code, bleed.present) == ("Hemorrhage", "SCT:50960005", True)
        assert bleed.probability == pytest.approx(0.93)
        assert (bleed.model, bleed.model_version) == ("demo-net", "1.2.0")
        assert bleed.key_sop_instance_uid == key.SOPInstanceUID
        assert bleed.volume_ml == pytest.approx(3.5)
        assert bleed.location == pytest.approx((1.0, 2.0, 15.0))
        assert mass.present is False and mass.key_sop_instance_uid is None
        assert summary.present_findings == (bleed,)
        assert summary.headline == "Hemorrhage (p=0.93)"
        assert "Patient" not in str(summary.as_json())

    def test_failed_analysis_headline_gives_the_reason(self, synthetic_series) -> None:
        sr = build_measurement_report(
            headers(synthetic_series(3)),
            [],
            outcome=AnalysisOutcomeValues.FAILED,
            failure_reason="inconsistent slice spacing",
        )
        summary = summarize_report(sr)
        assert summary.findings == ()
        assert summary.failure_reason == "inconsistent slice spacing"
        assert summary.headline == "AI could not analyse this study: inconsistent slice spacing"

    def test_no_applicable_model(self, synthetic_series) -> None:
        sr = build_measurement_report(
            headers(synthetic_series(3)), [], outcome=AnalysisOutcomeValues.NO_APPLICABLE_MODEL
        )
        assert summarize_report(sr).headline == "No applicable AI model"

    def test_other_documents_are_refused(self, synthetic_series) -> None:
        with pytest.raises(ValueError, match="not a TID 1500 Imaging Measurement Report"):
            summarize_report(synthetic_series(1)[0])
