"""Tests for pipeline/selection.py: model applicability rules as data."""

from __future__ import annotations

import pytest

from pipeline.selection import SeriesDescriptor, SeriesRule

HEAD_CT = SeriesDescriptor(
    series_instance_uid="1.2.3",
    modality="CT",
    body_part_examined="HEAD",
    series_description="Head 5mm axial",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    number_of_instances=32,
)


class TestSeriesRule:
    def test_matching_series_is_selected(self):
        rule = SeriesRule(
            modality=("CT",), body_part=("HEAD", "BRAIN"), image_type_includes=("AXIAL",)
        )
        assert rule.matches(HEAD_CT)

    def test_values_are_compared_case_insensitively(self):
        rule = SeriesRule(modality="ct", body_part=["head"], image_type_includes=["axial"])
        assert rule.matches(HEAD_CT)

    def test_other_modality_is_rejected(self):
        assert not SeriesRule(modality=("MR",)).matches(HEAD_CT)

    def test_other_body_part_is_rejected(self):
        assert not SeriesRule(modality=("CT",), body_part=("CHEST",)).matches(HEAD_CT)

    def test_missing_body_part_falls_back_to_description_keywords(self):
        series = SeriesDescriptor("1.2.4", "CT", series_description="BRAIN W/O")
        rule = SeriesRule(modality=("CT",), body_part=("HEAD",), body_part_keywords=("BRAIN",))
        assert rule.matches(series)
        assert not SeriesRule(modality=("CT",), body_part=("HEAD",)).matches(series)

    def test_study_description_counts_for_keywords(self):
        series = SeriesDescriptor("1.2.4", "CT", study_description="CT HEAD non-contrast")
        rule = SeriesRule(modality=("CT",), body_part=("HEAD",), body_part_keywords=("HEAD",))
        assert rule.matches(series)

    def test_series_description_pattern(self):
        assert SeriesRule(modality=("CT",), series_description=r"axial").matches(HEAD_CT)
        assert not SeriesRule(modality=("CT",), series_description=r"^sag").matches(HEAD_CT)

    def test_excluded_description_rejects(self):
        scout = SeriesDescriptor("1.2.5", "CT", series_description="Topogram 0.6 T20f")
        rule = SeriesRule(modality=("CT",), exclude_series_description="SCOUT|TOPOGRAM|LOCALIZER")
        assert not rule.matches(scout)
        assert rule.matches(HEAD_CT)

    def test_missing_image_type_value_rejects(self):
        assert not SeriesRule(modality=("CT",), image_type_includes=("AXIAL", "DERIVED")).matches(
            HEAD_CT
        )

    @pytest.mark.parametrize(
        ("minimum", "maximum", "expected"),
        [(20, None, True), (33, None, False), (None, 32, True), (None, 31, False), (32, 32, True)],
    )
    def test_instance_count_bounds(self, minimum, maximum, expected):
        rule = SeriesRule(modality=("CT",), min_instances=minimum, max_instances=maximum)
        assert rule.matches(HEAD_CT) is expected

    def test_rule_without_modality_raises(self):
        with pytest.raises(ValueError, match="modality must name at least one modality"):
            SeriesRule(modality=())

    def test_invalid_pattern_raises(self):
        with pytest.raises(ValueError, match="series_description is not a valid regular"):
            SeriesRule(modality=("CT",), series_description="(unclosed")

    def test_inverted_bounds_raise(self):
        with pytest.raises(ValueError, match="min_instances must not exceed max_instances"):
            SeriesRule(modality=("CT",), min_instances=10, max_instances=5)

    def test_rules_compare_by_criteria(self):
        assert SeriesRule(modality="CT", series_description="ax") == SeriesRule(
            modality=("ct",), series_description="ax"
        )
