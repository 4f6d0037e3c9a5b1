"""Tests for pipeline/uids.py: validation and deterministic derivation."""

from __future__ import annotations

import pytest

from pipeline.uids import InvalidUIDError, deterministic_uid, is_valid_uid, validate_uid


class TestValidateUID:
    def test_valid_uid_is_returned_without_padding(self):
        assert validate_uid("1.2.840.10008.1.2\x00") == "1.2.840.10008.1.2"

    def test_path_characters_raise(self):
        with pytest.raises(InvalidUIDError, match="characters other than digits and dots"):
            validate_uid("1.2/../3", "StudyInstanceUID")

    def test_too_long_raises(self):
        with pytest.raises(InvalidUIDError, match="longer than 64"):
            validate_uid("1." + "2" * 70)

    def test_missing_is_invalid(self):
        assert not is_valid_uid(None)


class TestDeterministicUID:
    def test_same_parts_give_same_uid(self):
        assert deterministic_uid("1.2.3", "model", "1.0", 1) == deterministic_uid(
            "1.2.3", "model", "1.0", 1
        )

    def test_other_parts_give_other_uid(self):
        assert deterministic_uid("1.2.3", "model", "1.0", 1) != deterministic_uid(
            "1.2.3", "model", "1.0", 2
        )

    def test_part_boundaries_matter(self):
        assert deterministic_uid("1.2", "3") != deterministic_uid("1.23")

    def test_result_is_valid_uid(self):
        uid = deterministic_uid("1.2.3", "x")
        assert validate_uid(uid) == uid
        assert len(uid) <= 64

    def test_no_parts_raises(self):
        with pytest.raises(ValueError, match="at least one part"):
            deterministic_uid()
