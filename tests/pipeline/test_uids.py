import pytest

from pipeline.uids import InvalidUIDError, deterministic_uid, is_valid_uid, validate_uid


class TestValidateUID:
    def test_valid_uid_is_returned_without_padding(self) -> None:
        assert validate_uid("1.2.840.10008.5.1.4.1.1.2\x00") == "1.2.840.10008.5.1.4.1.1.2"

    def test_uid_of_64_characters_is_valid(self) -> None:
        uid = "1." + "2" * 62
        assert len(uid) == 64
        assert validate_uid(uid) == uid

    def test_uid_longer_than_64_raises(self) -> None:
        with pytest.raises(InvalidUIDError, match="longer than 64"):
            validate_uid("1." + "2" * 63, "SOPInstanceUID")

    @pytest.mark.parametrize(
        "value", ["../../etc/passwd", "1.2.3/4", "1.2.a", "1..2", ".1.2", "1.2.", "1 2", "1.2\\3"]
    )
    def test_uid_with_other_characters_raises(self, value: str) -> None:
        with pytest.raises(InvalidUIDError, match="digits and dots"):
            validate_uid(value, "StudyInstanceUID")

    @pytest.mark.parametrize("value", [None, "", "\x00"])
    def test_missing_uid_raises(self, value: object) -> None:
        with pytest.raises(InvalidUIDError, match=r"StudyInstanceUID is (missing|empty)"):
            validate_uid(value, "StudyInstanceUID")

    def test_leading_zero_component_is_tolerated(self) -> None:
        assert is_valid_uid("1.2.03.4")


class TestDeterministicUID:
    def test_same_parts_give_same_uid(self) -> None:
        assert deterministic_uid("1.2.3", "model", "1.0", 1) == deterministic_uid(
            "1.2.3", "model", "1.0", 1
        )

    def test_other_parts_give_other_uid(self) -> None:
        assert deterministic_uid("1.2.3", "model", "1.0", 1) != deterministic_uid(
            "1.2.3", "model", "1.0", 2
        )

    def test_part_boundaries_matter(self) -> None:
        assert deterministic_uid("1.2", "3") != deterministic_uid("1.23")

    def test_result_is_valid_uid(self) -> None:
        uid = deterministic_uid("1.2.3", "x")
        assert validate_uid(uid) == uid
        assert len(uid) <= 64

    def test_no_parts_raises(self) -> None:
        with pytest.raises(ValueError, match="at least one part"):
            deterministic_uid()
