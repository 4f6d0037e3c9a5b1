"""archive.query on SQLite and PostgreSQL: PS3.4 C.2.2.2 matching, derived keys, refusals."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset

from archive import status
from archive.db import Database
from archive.ingest import Ingest
from archive.query import QueryError, new_query, parse_identifier, run
from archive.store import FileStore
from tests.dicom_factory import ct_dataset, part10_bytes

STUDY_A = "1.2.826.0.1.3680043.8.498.1001"
STUDY_B = "1.2.826.0.1.3680043.8.498.1002"
STUDY_C = "1.2.826.0.1.3680043.8.498.1003"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def index(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    """Three studies: two of Doe^John (CT; CT+SR), one of O'Brien with metacharacters.

    Built once per backend for the module (the tests only read).
    """
    tmp_path = tmp_path_factory.mktemp("query-index")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.sqlite'}"
        Database(url).upgrade()
    else:
        url = request.getfixturevalue("postgres").create()
    db = Database(url)
    ingest = Ingest(db, FileStore(tmp_path / "store", fsync=False))
    specs = [
        (STUDY_A, "PID-1", "Doe^John", "ACC_1", "20240105", "CT", 3),
        (STUDY_B, "PID-1", "Doe^John", "ACC%2", "20240310", "CT", 2),
        (STUDY_B, "PID-1", "Doe^John", "ACC%2", "20240310", "SR", 1),
        (STUDY_C, "PID-2", "o'brien^mary", "ACC\\3", "20231231", "MR", 1),
    ]
    for study, pid, name, accession, date, modality, count in specs:
        series = f"{study}.{int.from_bytes(modality.encode())}"
        for number in range(1, count + 1):
            ds = ct_dataset(
                study_instance_uid=study,
                series_instance_uid=series,
                sop_instance_uid=f"{series}.{number}",
                patient_id=pid,
                patient_name=name,
                accession_number=accession.replace("\\", "/"),
                study_date=date,
                modality=modality,
                instance_number=number,
            )
            assert ingest.store(part10_bytes(ds)).ok
    yield db
    db.dispose()
    if request.param == "postgresql":
        request.getfixturevalue("postgres").drop(url)


def find(db: Database, level: str, *keys: tuple[str, str], model: str = "STUDY_ROOT") -> list:
    query = new_query(level, model, list(keys), [], db.dialect)
    with db.reader() as session:
        return list(run(session, query))


def studies(db: Database, *keys: tuple[str, str]) -> list[str]:
    return sorted(ds.StudyInstanceUID for ds in find(db, "STUDY", *keys))


class TestMatching:
    def test_single_value_and_universal(self, index: Database) -> None:
        assert studies(index, ("PatientID", "PID-1")) == [STUDY_A, STUDY_B]
        assert studies(index, ("PatientID", "")) == [STUDY_A, STUDY_B, STUDY_C]

    def test_person_name_is_case_insensitive(self, index: Database) -> None:
        assert studies(index, ("PatientName", "DOE^JOHN")) == [STUDY_A, STUDY_B]
        assert studies(index, ("PatientName", "O'BRIEN*")) == [STUDY_C]
        assert studies(index, ("PatientName", "d?e*")) == [STUDY_A, STUDY_B]

    def test_wildcard_escapes_like_metacharacters(self, index: Database) -> None:
        # '%' and '_' are literal in DICOM; only '*' and '?' are wild cards.
        assert studies(index, ("AccessionNumber", "ACC%*")) == [STUDY_B]
        assert studies(index, ("AccessionNumber", "ACC_*")) == [STUDY_A]
        assert studies(index, ("AccessionNumber", "ACC?1")) == [STUDY_A]
        assert studies(index, ("AccessionNumber", "%")) == []

    def test_sql_text_in_value_is_data(self, index: Database) -> None:
        assert studies(index, ("PatientID", "x' OR '1'='1")) == []
        assert studies(index, ("PatientName", "*'; DROP TABLE patient; --*")) == []
        assert studies(index, ("PatientID", "PID-1")) == [STUDY_A, STUDY_B]

    def test_date_ranges(self, index: Database) -> None:
        assert studies(index, ("StudyDate", "20240101-20240131")) == [STUDY_A]
        assert studies(index, ("StudyDate", "20240101-")) == [STUDY_A, STUDY_B]
        assert studies(index, ("StudyDate", "-20231231")) == [STUDY_C]
        assert studies(index, ("StudyDate", "20240105")) == [STUDY_A]

    def test_list_of_uid(self, index: Database) -> None:
        assert studies(index, ("StudyInstanceUID", f"{STUDY_A}\\{STUDY_C}")) == [STUDY_A, STUDY_C]

    def test_modalities_in_study_matches_any_series(self, index: Database) -> None:
        assert studies(index, ("ModalitiesInStudy", "SR")) == [STUDY_B]
        assert studies(index, ("ModalitiesInStudy", "SR\\MR")) == [STUDY_B, STUDY_C]

    def test_derived_keys(self, index: Database) -> None:
        (ds,) = find(
            index,
            "STUDY",
            ("StudyInstanceUID", STUDY_B),
            ("ModalitiesInStudy", ""),
            ("NumberOfStudyRelatedSeries", ""),
            ("NumberOfStudyRelatedInstances", ""),
        )
        assert sorted(ds.ModalitiesInStudy) == ["CT", "SR"]
        assert int(ds.NumberOfStudyRelatedSeries) == 2
        assert int(ds.NumberOfStudyRelatedInstances) == 3
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        (patient,) = find(
            index,
            "PATIENT",
            ("PatientID", "PID-1"),
            ("NumberOfPatientRelatedStudies", ""),
            ("NumberOfPatientRelatedInstances", ""),
            model="PATIENT_ROOT",
        )
        assert int(patient.NumberOfPatientRelatedStudies) == 2
        assert int(patient.NumberOfPatientRelatedInstances) == 6

    def test_series_and_image_levels(self, index: Database) -> None:
        series = find(index, "SERIES", ("StudyInstanceUID", STUDY_B), ("Modality", "SR"))
        assert [ds.Modality for ds in series] == ["SR"]
        images = find(
            index,
            "IMAGE",
            ("StudyInstanceUID", STUDY_A),
            ("InstanceNumber", "2"),
            ("SOPInstanceUID", ""),
        )
        assert [ds.SOPInstanceUID.split(".")[-1] for ds in images] == ["2"]

    def test_return_keys_only_those_requested(self, index: Database) -> None:
        (ds,) = find(index, "STUDY", ("AccessionNumber", "ACC_1"), ("StudyDescription", ""))
        assert set(ds.dir()) == {
            "AccessionNumber",
            "QueryRetrieveLevel",
            "SpecificCharacterSet",
            "StudyDescription",
            "StudyInstanceUID",
        }


class TestRefusals:
    @pytest.mark.parametrize(
        ("keys", "code", "message"),
        [
            ((("StudyDate", "20241301"),), status.UNABLE_TO_PROCESS, "no such date"),
            ((("StudyDate", "2024-01-01-2023"),), status.UNABLE_TO_PROCESS, "StudyDate"),
            ((("StudyDate", "20240201-20240101"),), status.UNABLE_TO_PROCESS, "start after end"),
            ((("StudyInstanceUID", "1.2.*"),), status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "wild"),
            ((("StudyInstanceUID", "1.2.abc"),), status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "UID"),
            (
                (("SeriesInstanceUID", "1.2.3"),),
                status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                "below",
            ),
            ((("PatientComments", "x"),), status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "not supp"),
            ((("PatientName", "*" * 2000),), status.UNABLE_TO_PROCESS, "too long"),
            ((("StudyTime", "2561"),), status.UNABLE_TO_PROCESS, "StudyTime"),
        ],
    )
    def test_malformed_query_gets_status(
        self, index: Database, keys: tuple, code: int, message: str
    ) -> None:
        with pytest.raises(QueryError, match=message) as info:
            new_query("STUDY", "STUDY_ROOT", list(keys), [], index.dialect)
        assert info.value.status == code

    def test_unknown_level(self, index: Database) -> None:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "FRAME"
        with pytest.raises(QueryError, match="QueryRetrieveLevel") as info:
            parse_identifier(identifier, "STUDY_ROOT", index.dialect)
        assert info.value.status == status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS

    def test_patient_level_not_in_study_root(self, index: Database) -> None:
        with pytest.raises(QueryError, match="Study Root"):
            new_query("PATIENT", "STUDY_ROOT", [("PatientID", "")], [], index.dialect)
