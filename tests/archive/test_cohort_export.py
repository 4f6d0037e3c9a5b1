"""The cohort results table: rows per study and finding, CSV and Parquet, keyed pseudonyms."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.sr.coding import Code
from sqlalchemy import select

from archive.cohort_export import (
    COLUMN_NAMES,
    Pseudonymizer,
    export_images,
    results_rows,
    write_results,
)
from archive.cohorts import (
    CohortItemStatusValues,
    ItemOutcome,
    StudyQuery,
    begin_run,
    claim_next_item,
    create_cohort,
    finish_item,
    select_studies,
)
from archive.index import Series, Study
from archive.results import record_result
from pipeline.findings import FindingDefinition, FindingResult, ModelIdentity, ModelResult
from tests.flows.cohort_support import Archive

MODEL = ModelIdentity("ich", "1.0", "ab" * 32)
HEMORRHAGE = FindingDefinition("hemorrhage", Code("50960005", "SCT", "Hemorrhage"), "critical", 0.5)


@pytest.fixture
def analysed(tmp_path: Path) -> Archive:
    """Three studies in a cohort: two analysed (0.9 and 0.2), one failed."""
    archive = Archive.create(tmp_path / "data")
    for seed in range(3):
        archive.add_phantom(tmp_path / "w", seed, patient_id=f"SECRET{seed}")
    studies = select_studies(archive.db, StudyQuery())
    info = create_cohort(
        archive.db,
        "c",
        model_name=MODEL.name,
        model_version=MODEL.version,
        weights_sha256=MODEL.weights_sha256,
        selection={},
        studies=studies,
    )
    begin_run(archive.db, info.id, "r")
    for probability in (0.9, 0.2, None):
        item = claim_next_item(archive.db, info.id)
        assert item is not None
        if probability is None:
            outcome = ItemOutcome(CohortItemStatusValues.FAILED, error="series 1.2.3: broken")
        else:
            with archive.db.reader() as session:
                series_uid = session.scalar(
                    select(Series.series_instance_uid).where(Series.study_pk == item.study_pk)
                )
            record_result(
                archive.db,
                study_pk=item.study_pk,
                fingerprint="f" * 64,
                result=ModelResult(
                    MODEL,
                    series_uid,
                    (FindingResult(HEMORRHAGE, probability, volume_ml=1.5, location=(1, 2, 3)),),
                    0.25,
                ),
                mode="active",
            )
            outcome = ItemOutcome(CohortItemStatusValues.DONE, total_seconds=0.5)
        finish_item(archive.db, item.id, outcome)
    yield archive
    archive.db.dispose()


class TestResultsTable:
    def test_one_row_per_finding_and_one_per_failed_study(self, analysed: Archive) -> None:
        rows = results_rows(analysed.db, "c")
        assert [(r["status"], r["finding"], r["probability"], r["present"]) for r in rows] == [
            ("done", "hemorrhage", 0.9, True),
            ("done", "hemorrhage", 0.2, False),
            ("failed", None, None, None),
        ]
        assert rows[0]["volume_ml"] == 1.5
        assert (rows[0]["location_x"], rows[0]["location_z"]) == (1, 3)
        assert rows[2]["error"] == "series 1.2.3: broken"
        assert rows[0]["PatientID"] == "SECRET0"

    def test_csv_and_parquet_hold_the_same_table(self, analysed: Archive, tmp_path: Path) -> None:
        rows = results_rows(analysed.db, "c")
        table = pq.read_table(write_results(rows, tmp_path / "r.parquet"))
        assert table.column_names == list(COLUMN_NAMES)
        assert table.column("probability").to_pylist() == [0.9, 0.2, None]
        assert str(table.schema.field("present").type) == "bool"
        with write_results(rows, tmp_path / "r.csv").open() as handle:
            read = list(csv.DictReader(handle))
        assert [r["probability"] for r in read] == ["0.9", "0.2", ""]
        assert [r["StudyInstanceUID"] for r in read] == table.column("StudyInstanceUID").to_pylist()
        with pytest.raises(ValueError, match=r"must end in \.csv or \.parquet"):
            write_results(rows, tmp_path / "r.xlsx")


class TestPseudonyms:
    def test_same_key_same_pseudonyms_no_identifiers_left(self, analysed: Archive) -> None:
        rows = results_rows(analysed.db, "c")
        first = Pseudonymizer("research-key-1").rows(rows)
        again = Pseudonymizer("research-key-1").rows(rows)
        other = Pseudonymizer("research-key-2").rows(rows)
        assert first == again
        assert [r["StudyInstanceUID"] for r in first] != [r["StudyInstanceUID"] for r in other]
        text = repr(first)
        for row in rows:
            for key in ("PatientID", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID"):
                if row[key]:
                    assert row[key] not in text, key
        assert all(pydicom.uid.UID(r["StudyInstanceUID"]).is_valid for r in first)
        assert first[0]["probability"] == 0.9  # the results themselves are unchanged

    def test_images_carry_the_table_pseudonyms(self, analysed: Archive, tmp_path: Path) -> None:
        pseudonymizer = Pseudonymizer("research-key-1")
        table = pseudonymizer.rows(results_rows(analysed.db, "c"))
        written = export_images(
            analysed.db, analysed.file_store, "c", tmp_path / "images", pseudonymizer
        )
        with analysed.db.reader() as session:
            assert (
                written
                == 3 * 8
                == session.scalar(select(Study.number_of_study_related_instances).limit(1)) * 3
            )
        folders = {p.name for p in (tmp_path / "images").iterdir()}
        assert folders == {r["StudyInstanceUID"] for r in table}
        sample = pydicom.dcmread(next((tmp_path / "images").rglob("*.dcm")))
        assert sample.PatientID in {r["PatientID"] for r in table}
        assert not str(sample.PatientID).startswith("SECRET")
        assert sample.PatientName != "Phantom^Head"

    def test_short_key_is_refused(self) -> None:
        with pytest.raises(ValueError, match="at least 8 characters"):
            Pseudonymizer("short")
