"""Tests for pipeline/priority.py: the triage policy and worklist aging."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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
from pipeline.priority import (
    OrderContext,
    PriorityClassValues,
    PriorityPolicy,
    RequestedProcedurePriorityValues,
    assess_priority,
    effective_priority,
    parse_requested_procedure_priority,
)

HEMORRHAGE = FindingDefinition(
    "hemorrhage", Code("50960005", "SCT", "Hemorrhage"), SeverityValues.CRITICAL, 0.5
)
FRACTURE = FindingDefinition(
    "fracture", Code("125605004", "SCT", "Fracture of bone"), SeverityValues.URGENT, 0.4
)
CYST = FindingDefinition("cyst", Code("441457006", "SCT", "Cyst"), SeverityValues.ROUTINE, 0.5)
MODEL = ModelIdentity("ich-detector", "1.0.0", "ab" * 32)


def result(*findings: tuple[FindingDefinition, float]) -> ModelResult:
    return ModelResult(
        model=MODEL,
        series_instance_uid="1.2.3",
        findings=tuple(FindingResult(d, p) for d, p in findings),
    )


class TestParseRequestedProcedurePriority:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("STAT", RequestedProcedurePriorityValues.STAT),
            (" stat ", RequestedProcedurePriorityValues.STAT),
            ("EMERGENCY", RequestedProcedurePriorityValues.STAT),
            ("HIGH", RequestedProcedurePriorityValues.HIGH),
            ("urgent", RequestedProcedurePriorityValues.HIGH),
            ("ASAP", RequestedProcedurePriorityValues.HIGH),
            ("MEDIUM", RequestedProcedurePriorityValues.MEDIUM),
            ("ROUTINE", RequestedProcedurePriorityValues.ROUTINE),
            ("LOW", RequestedProcedurePriorityValues.LOW),
            ("whenever", None),
            ("", None),
            (None, None),
        ],
    )
    def test_values_are_read_tolerantly(self, raw, expected):
        assert parse_requested_procedure_priority(raw) is expected


class TestOrderContext:
    def test_from_dataset_reads_top_level_and_request_attributes(self):
        ds = pydicom.Dataset()
        ds.CurrentPatientLocation = "ED bay 4"
        item = pydicom.Dataset()
        item.RequestedProcedurePriority = "HIGH"
        item.ReasonForTheRequestedProcedure = "suspected stroke"
        ds.RequestAttributesSequence = [item]
        order = OrderContext.from_dataset(ds)
        assert order.requested_procedure_priority is RequestedProcedurePriorityValues.HIGH
        assert order.reason_for_requested_procedure == "suspected stroke"
        assert order.current_patient_location == "ED bay 4"

    def test_from_dataset_without_order_is_empty(self):
        assert OrderContext.from_dataset(pydicom.Dataset()) == OrderContext()

    def test_string_priority_is_parsed(self):
        assert OrderContext("stat").requested_procedure_priority is (
            RequestedProcedurePriorityValues.STAT
        )


class TestAssessPriority:
    def test_critical_finding_present_is_stat(self):
        assessment = assess_priority([result((HEMORRHAGE, 0.7))])
        assert assessment.priority_class is PriorityClassValues.STAT
        assert 80 <= assessment.score < 90
        assert assessment.reason == "STAT: Hemorrhage present (p=0.70, critical)"

    def test_high_confidence_scores_above_plain_presence(self):
        plain = assess_priority([result((HEMORRHAGE, 0.85))])
        confident = assess_priority([result((HEMORRHAGE, 0.95))])
        assert plain.score < 90 <= confident.score <= 100
        assert "high confidence" in confident.reason

    def test_urgent_finding_is_urgent(self):
        assessment = assess_priority([result((FRACTURE, 0.6), (HEMORRHAGE, 0.1))])
        assert assessment.priority_class is PriorityClassValues.URGENT
        assert 50 <= assessment.score < 80

    def test_routine_finding_scores_above_negatives(self):
        routine = assess_priority([result((CYST, 0.8))])
        negative = assess_priority([result((HEMORRHAGE, 0.45))])
        assert routine.priority_class is negative.priority_class is PriorityClassValues.ROUTINE
        assert 25 <= routine.score < 50
        assert negative.score < 25

    def test_near_miss_ranks_above_clear_negative(self):
        near = assess_priority([result((HEMORRHAGE, 0.45))])
        clear = assess_priority([result((HEMORRHAGE, 0.02))])
        assert near.score > clear.score
        assert near.reason.startswith("ROUTINE: no finding above threshold (highest: Hemorrhage")

    def test_highest_finding_across_models_wins(self):
        other = ModelResult(
            ModelIdentity("fracture", "2", "cd" * 32),
            "1.2.4",
            (FindingResult(FRACTURE, 0.9),),
        )
        assessment = assess_priority([result((HEMORRHAGE, 0.1)), other])
        assert assessment.priority_class is PriorityClassValues.URGENT
        assert assessment.findings[0].model_name == "fracture"

    def test_site_threshold_override_changes_presence(self):
        policy = PriorityPolicy(threshold_overrides={"hemorrhage": 0.8})
        assessment = assess_priority([result((HEMORRHAGE, 0.7))], policy=policy)
        assert assessment.priority_class is PriorityClassValues.ROUTINE
        assert not assessment.findings[0].present

    def test_stat_requires_high_confidence_demotes_to_urgent(self):
        policy = PriorityPolicy(stat_requires_high_confidence=True)
        assert (
            assess_priority([result((HEMORRHAGE, 0.7))], policy=policy).priority_class
            is PriorityClassValues.URGENT
        )
        assert (
            assess_priority([result((HEMORRHAGE, 0.95))], policy=policy).priority_class
            is PriorityClassValues.STAT
        )

    def test_stat_order_without_finding_is_stat_below_ai_positive(self):
        order_only = assess_priority([result((HEMORRHAGE, 0.1))], OrderContext("STAT"))
        ai_positive = assess_priority([result((HEMORRHAGE, 0.6))])
        assert order_only.priority_class is PriorityClassValues.STAT
        assert order_only.score == 80
        assert ai_positive.score > order_only.score
        assert order_only.reason.endswith("order priority STAT")

    def test_order_never_lowers_ai_priority(self):
        assessment = assess_priority([result((HEMORRHAGE, 0.95))], OrderContext("LOW"))
        assert assessment.priority_class is PriorityClassValues.STAT

    def test_emergency_location_makes_urgent(self):
        order = OrderContext(current_patient_location="Emergency Dept")
        assessment = assess_priority([], order)
        assert assessment.priority_class is PriorityClassValues.URGENT
        assert assessment.reason == "URGENT: no AI result; patient in emergency department"

    def test_location_keyword_needs_whole_word(self):
        order = OrderContext(current_patient_location="HERMANN WARD")  # contains "ER"
        assert assess_priority([], order).priority_class is PriorityClassValues.ROUTINE

    def test_reason_keyword_makes_urgent_without_echoing_reason(self):
        order = OrderContext(reason_for_requested_procedure="Mrs Smith, ?stroke since 9am")
        assessment = assess_priority([], order)
        assert assessment.priority_class is PriorityClassValues.URGENT
        assert "Smith" not in assessment.reason
        assert "order reason mentions stroke" in assessment.reason

    def test_no_results_and_no_order_is_routine_zero(self):
        assessment = assess_priority([])
        assert (assessment.priority_class, assessment.score) == (PriorityClassValues.ROUTINE, 0)

    def test_invalid_policy_threshold_raises(self):
        with pytest.raises(ValueError, match=r"high_confidence_threshold must lie in \[0, 1\]"):
            PriorityPolicy(high_confidence_threshold=1.5)

    def test_policy_without_cap_for_a_class_raises(self):
        with pytest.raises(ValueError, match="max_wait must give a positive timedelta for URGENT"):
            PriorityPolicy(max_wait={"STAT": timedelta(hours=1), "ROUTINE": timedelta(hours=8)})


class TestEffectivePriority:
    T0 = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)

    def test_fresh_study_keeps_its_score(self):
        effective = effective_priority("ROUTINE", 10.0, self.T0, self.T0)
        assert effective.score == 10.0
        assert not effective.overdue

    def test_score_rises_linearly_to_top_at_cap(self):
        half = effective_priority("ROUTINE", 10.0, self.T0, self.T0 + timedelta(hours=12))
        full = effective_priority("ROUTINE", 10.0, self.T0, self.T0 + timedelta(hours=24))
        assert half.score == pytest.approx(55.0)
        assert half.effective_class is PriorityClassValues.URGENT
        assert half.priority_class is PriorityClassValues.ROUTINE
        assert full.score == pytest.approx(100.0)
        assert not full.overdue

    def test_overdue_study_ranks_above_fresh_stat(self):
        overdue = effective_priority("ROUTINE", 0.0, self.T0, self.T0 + timedelta(hours=25))
        fresh_stat = effective_priority("STAT", 100.0, self.T0 + timedelta(hours=25), self.T0)
        assert overdue.overdue
        assert overdue.score == pytest.approx(101.0)
        ranked = sorted([fresh_stat, overdue], key=lambda e: e.sort_key)
        assert ranked[0] is overdue

    def test_study_at_cap_outranks_every_fresh_study(self):
        for priority_class, cap in PriorityPolicy().max_wait.items():
            at_cap = effective_priority(priority_class, 0.0, self.T0, self.T0 + cap)
            fresh_top = effective_priority("STAT", 100.0, self.T0 + cap, self.T0 + cap)
            assert at_cap.score >= fresh_top.score
            assert at_cap.sort_key < fresh_top.sort_key  # equal score: longer wait first

    def test_routine_study_is_not_starved_by_a_stream_of_stat(self):
        # One ROUTINE study, then a STAT study every 5 minutes for 4 hours; the
        # radiologist reads one study every 5 minutes, always from the top.
        # Without aging the ROUTINE study would never be read.
        policy = PriorityPolicy(
            max_wait={
                "STAT": timedelta(hours=1),
                "URGENT": timedelta(hours=4),
                "ROUTINE": timedelta(hours=1),
            }
        )
        waiting = [("ROUTINE", 0.0, self.T0)]
        waits: dict[str, list[timedelta]] = {"STAT": [], "ROUTINE": []}
        for step in range(48):
            now = self.T0 + timedelta(minutes=5 * step)
            waiting.append(("STAT", 90.0, now))
            waiting.sort(key=lambda s: effective_priority(*s, now, policy).sort_key)
            priority_class, _, arrived = waiting.pop(0)
            waits[priority_class].append(now - arrived)
        assert waits["ROUTINE"] and waits["ROUTINE"][0] <= timedelta(hours=1)
        assert max(waits["STAT"]) <= timedelta(minutes=10)

    def test_clock_running_backwards_counts_as_no_wait(self):
        effective = effective_priority("URGENT", 60.0, self.T0, self.T0 - timedelta(minutes=5))
        assert effective.waiting == timedelta(0)
        assert effective.score == 60.0

    def test_mixed_naive_and_aware_datetimes_raise(self):
        with pytest.raises(TypeError, match="both be timezone-aware or both naive"):
            effective_priority("STAT", 90.0, self.T0, datetime(2026, 1, 1, 9, 0))

    def test_score_out_of_range_raises(self):
        with pytest.raises(ValueError, match=r"score must lie in \[0, 100\]"):
            effective_priority("STAT", 120.0, self.T0, self.T0)

    def test_unknown_class_raises(self):
        with pytest.raises(ValueError, match="'SOON' is not a valid PriorityClassValues"):
            effective_priority("SOON", 50.0, self.T0, self.T0)
