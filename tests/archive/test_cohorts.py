"""Cohort selection (query, CSV) and run bookkeeping, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from archive.cohorts import (
    CohortError,
    CohortItem,
    CohortItemStatusValues,
    CohortSelectionError,
    CohortStatusValues,
    ItemOutcome,
    StudyQuery,
    begin_run,
    claim_item,
    claim_next_item,
    clinical_work_waiting,
    create_cohort,
    end_run,
    fail_running_items,
    finish_item,
    get_cohort,
    pending_items,
    select_from_csv,
    select_studies,
    select_uids,
)
from archive.db import Database
from archive.index import Study, utcnow
from archive.ingest import Ingest
from archive.store import FileStore
from archive.triage import StableCandidate, mark_ready, stable_candidates
from tests.dicom_factory import ct_dataset


@pytest.fixture
def ingest(db: Database, tmp_path: Path) -> Ingest:
    return Ingest(db, FileStore(tmp_path / "store", fsync=False))


def add_study(ingest: Ingest, **attributes: object) -> str:
    ds = ct_dataset(**attributes)  # type: ignore[arg-type]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert ingest.store(buffer.getvalue(), calling_ae_title="TEST").ok
    return str(ds.StudyInstanceUID)


@pytest.fixture
def archive(ingest: Ingest) -> dict[str, str]:
    """Four studies with distinct patients, dates, modalities and descriptions."""
    return {
        "head_2024": add_study(
            ingest,
            patient_id="P1",
            accession_number="A1",
            study_date="20240105",
            study_description="CT HEAD WO",
            body_part_examined="HEAD",
        ),
        "head_2025": add_study(
            ingest,
            patient_id="P2",
            accession_number="A2",
            study_date="20250610",
            study_description="CT Head trauma",
            body_part_examined="BRAIN",
        ),
        "chest_2025": add_study(
            ingest,
            patient_id="P3",
            accession_number="A3",
            study_date="20250701",
            study_description="CT CHEST",
            body_part_examined="CHEST",
        ),
        "mr_2025": add_study(
            ingest,
            patient_id="P1",
            accession_number="A4",
            study_date="20250801",
            study_description="MR HEAD",
            modality="MR",
            body_part_examined="HEAD",
        ),
    }


def uids(selected: list) -> list[str]:
    return [s.study_instance_uid for s in selected]


class TestSelectStudies:
    def test_empty_query_selects_everything_oldest_first(
        self, db: Database, archive: dict[str, str]
    ) -> None:
        assert uids(select_studies(db, StudyQuery())) == [
            archive["head_2024"],
            archive["head_2025"],
            archive["chest_2025"],
            archive["mr_2025"],
        ]

    def test_modality_body_part_and_date_range_combine(
        self, db: Database, archive: dict[str, str]
    ) -> None:
        query = StudyQuery(modalities=("CT",), body_part="head", study_date_from="20240101")
        assert uids(select_studies(db, query)) == [archive["head_2024"]]
        query = StudyQuery(modalities=("CT",), study_date_from="20250101", study_date_to="20250630")
        assert uids(select_studies(db, query)) == [archive["head_2025"]]

    def test_description_keyword_is_case_insensitive(
        self, db: Database, archive: dict[str, str]
    ) -> None:
        selected = uids(select_studies(db, StudyQuery(study_description="head")))
        assert selected == [archive["head_2024"], archive["head_2025"], archive["mr_2025"]]

    def test_patient_and_accession_lists(self, db: Database, archive: dict[str, str]) -> None:
        assert uids(select_studies(db, StudyQuery(patient_ids=("P1",)))) == [
            archive["head_2024"],
            archive["mr_2025"],
        ]
        assert uids(select_studies(db, StudyQuery(accession_numbers=("A3", "A2")))) == [
            archive["head_2025"],
            archive["chest_2025"],
        ]

    def test_limit(self, db: Database, archive: dict[str, str]) -> None:
        assert uids(select_studies(db, StudyQuery(limit=2))) == [
            archive["head_2024"],
            archive["head_2025"],
        ]

    def test_bad_date_is_refused(self) -> None:
        with pytest.raises(CohortError, match="study_date_from must be a date YYYYMMDD"):
            StudyQuery(study_date_from="2025-01-01")


class TestSelectFromCsv:
    def test_uids_in_row_order_with_duplicates_once(
        self, db: Database, archive: dict[str, str]
    ) -> None:
        text = (
            f"StudyInstanceUID,comment\n{archive['mr_2025']},x\n\n"
            f"{archive['head_2024']},y\n{archive['mr_2025']},z\n"
        )
        assert uids(select_from_csv(db, text)) == [archive["mr_2025"], archive["head_2024"]]

    def test_accession_numbers_with_optional_patient_id(
        self, db: Database, archive: dict[str, str], ingest: Ingest
    ) -> None:
        other = add_study(ingest, patient_id="P9", accession_number="A1", study_date="20200101")
        text = "AccessionNumber,PatientID\nA2,\nA1,P9\n"
        assert uids(select_from_csv(db, text)) == [archive["head_2025"], other]

    def test_every_bad_row_is_named_by_line(
        self, db: Database, archive: dict[str, str], ingest: Ingest
    ) -> None:
        add_study(ingest, patient_id="P9", accession_number="A1", study_date="20200101")
        text = "AccessionNumber,PatientID\nA2,\nA1,\nNOPE,\n,P5\nA3,P1\n"
        with pytest.raises(CohortSelectionError) as caught:
            select_from_csv(db, text)
        assert caught.value.problems == [
            "line 3: AccessionNumber 'A1' matches 2 studies; add a PatientID column",
            "line 4: no study with AccessionNumber 'NOPE' in the archive",
            "line 5: AccessionNumber empty",
            "line 6: no study with AccessionNumber 'A3' with that PatientID in the archive",
        ]
        assert "P1" not in str(caught.value) and "P5" not in str(
            caught.value
        )  # patient IDs are not echoed

    def test_invalid_uid_row(self, db: Database, archive: dict[str, str]) -> None:
        with pytest.raises(CohortSelectionError, match=r"line 3: StudyInstanceUID .*digits"):
            select_from_csv(db, f"StudyInstanceUID\n{archive['mr_2025']}\n1.2.abc\n")

    def test_csv_without_a_known_column(self, db: Database) -> None:
        with pytest.raises(CohortSelectionError, match="needs a header with a StudyInstanceUID"):
            select_from_csv(db, "uid\n1.2.3\n")

    def test_unknown_uid(self, db: Database, archive: dict[str, str]) -> None:
        missing = generate_uid()
        with pytest.raises(CohortSelectionError, match=f"no study with StudyInstanceUID {missing}"):
            select_uids(db, [archive["mr_2025"], missing])


def make_cohort(db: Database, studies: list, name: str = "c1"):  # type: ignore[no-untyped-def]
    return create_cohort(
        db,
        name,
        model_name="ich",
        model_version="1.0",
        weights_sha256="0" * 64,
        selection={"kind": "query"},
        studies=studies,
    )


class TestCohortBookkeeping:
    def test_create_saves_membership_in_order(self, db: Database, archive: dict[str, str]) -> None:
        selected = select_studies(db, StudyQuery(modalities=("CT",)))
        info = make_cohort(db, selected + selected[:1])
        assert info.total == 3
        assert info.counts == {"pending": 3}
        assert info.status is CohortStatusValues.CREATED
        with db.reader() as session:
            rows = session.execute(
                select(CohortItem.study_instance_uid).order_by(CohortItem.position)
            ).scalars()
            assert list(rows) == uids(selected)

    def test_name_is_unique_and_selection_not_empty(
        self, db: Database, archive: dict[str, str]
    ) -> None:
        make_cohort(db, select_studies(db, StudyQuery()))
        with pytest.raises(CohortError, match="a cohort named 'c1' exists already"):
            make_cohort(db, select_studies(db, StudyQuery()))
        with pytest.raises(CohortSelectionError, match="matches no study"):
            make_cohort(db, [], name="c2")
        with pytest.raises(CohortError, match="must not contain slashes"):
            make_cohort(db, select_studies(db, StudyQuery()), name="a/b")

    def test_claim_in_order_then_none(self, db: Database, archive: dict[str, str]) -> None:
        info = make_cohort(db, select_studies(db, StudyQuery()))
        begin_run(db, info.id, "run-1")
        claimed = [claim_next_item(db, info.id) for _ in range(5)]
        assert [c.study_instance_uid if c else None for c in claimed] == [
            *uids(select_studies(db, StudyQuery())),
            None,
        ]
        assert all(c.attempts == 1 for c in claimed if c)

    def test_killed_run_is_resumed_without_losing_or_repeating(
        self, db: Database, archive: dict[str, str]
    ) -> None:
        info = make_cohort(db, select_studies(db, StudyQuery()))
        begin_run(db, info.id, "run-1")
        first = claim_next_item(db, info.id)
        assert first is not None
        finish_item(db, first.id, ItemOutcome(CohortItemStatusValues.DONE))
        second = claim_next_item(db, info.id)  # "running" when the run dies
        assert second is not None
        with pytest.raises(CohortError, match="cohort is being run by run-1"):
            begin_run(db, info.id, "run-2", stale_after_seconds=60)
        assert begin_run(db, info.id, "run-2", stale_after_seconds=0) == 1
        again = [claim_next_item(db, info.id) for _ in range(4)]
        assert [c.study_instance_uid if c else None for c in again] == [
            second.study_instance_uid,
            *uids(select_studies(db, StudyQuery()))[2:],
            None,
        ]
        assert again[0] is not None and again[0].attempts == 2
        for item in again[:3]:
            assert item is not None
            finish_item(db, item.id, ItemOutcome(CohortItemStatusValues.DONE))
        assert end_run(db, info.id, "run-2") is CohortStatusValues.DONE
        final = get_cohort(db, "c1")
        assert final.counts == {"done": 4}
        assert final.finished_at is not None

    def test_failed_outcome_needs_a_reason(self) -> None:
        with pytest.raises(ValueError, match="error is required"):
            ItemOutcome(CohortItemStatusValues.FAILED)

    def test_failure_is_recorded_and_run_ends_done(
        self, db: Database, archive: dict[str, str]
    ) -> None:
        info = make_cohort(db, select_studies(db, StudyQuery(limit=2)))
        begin_run(db, info.id, "r")
        a, b = claim_next_item(db, info.id), claim_next_item(db, info.id)
        assert a is not None and b is not None
        finish_item(db, a.id, ItemOutcome(CohortItemStatusValues.FAILED, error="corrupt"))
        finish_item(db, b.id, ItemOutcome(CohortItemStatusValues.DONE, total_seconds=0.5))
        assert end_run(db, info.id, "r") is CohortStatusValues.DONE
        with db.reader() as session:
            count = session.scalar(
                select(func.count()).where(
                    CohortItem.error == "corrupt", CohortItem.status == "failed"
                )
            )
        assert count == 1


class TestClinicalLane:
    def test_pending_and_leased_jobs_hold_cohorts_back(
        self, db: Database, archive: dict[str, str]
    ) -> None:
        assert clinical_work_waiting(db, stale_pending_seconds=900) == 0
        candidate = next(
            c
            for c in stable_candidates(db, since=None)
            if c.study_instance_uid == archive["mr_2025"]
        )
        assert mark_ready(db, StableCandidate(*candidate.__dict__.values())) == 1
        assert clinical_work_waiting(db, stale_pending_seconds=900) == 1
        # A job pending for longer than the stale limit (no dispatcher) no longer holds back.
        later = utcnow() + timedelta(seconds=1000)
        assert clinical_work_waiting(db, stale_pending_seconds=900, now=later) == 0


class TestClaimItem:
    def test_claim_records_the_study_before_in_the_same_call(
        self, db: Database, archive: dict[str, str]
    ) -> None:
        info = make_cohort(db, select_studies(db, StudyQuery()))
        begin_run(db, info.id, "r")
        (first_id, _), (second_id, _), *_ = pending_items(db, info.id)
        first = claim_item(db, info.id, first_id, "r").item
        assert first is not None and first.attempts == 1
        done = ItemOutcome(CohortItemStatusValues.DONE, total_seconds=0.5)
        second = claim_item(db, info.id, second_id, "r", finished=(first_id, done)).item
        assert second is not None
        assert get_cohort(db, "c1").counts == {"done": 1, "running": 1, "pending": 2}
        # A study no longer pending is not claimed again.
        assert claim_item(db, info.id, first_id, "r").item is None
        assert [pk for pk, _ in pending_items(db, info.id)] == [
            pk for pk, _ in pending_items(db, info.id, limit=2)
        ]

    def test_no_claim_while_clinical_work_waits(
        self, db: Database, archive: dict[str, str]
    ) -> None:
        info = make_cohort(db, select_studies(db, StudyQuery(modalities=("CT",))))
        begin_run(db, info.id, "r")
        candidate = next(
            c
            for c in stable_candidates(db, since=None)
            if c.study_instance_uid == archive["mr_2025"]
        )
        assert mark_ready(db, StableCandidate(*candidate.__dict__.values())) == 1
        item_id, _ = pending_items(db, info.id)[0]
        claim = claim_item(db, info.id, item_id, "r", stale_pending_seconds=900)
        assert claim.item is None and claim.clinical_waiting == 1 and claim.owner
        # Without the lane (cohort_yield_to_triage off) the study is claimed.
        assert claim_item(db, info.id, item_id, "r").item is not None

    def test_no_claim_after_another_run_took_over(
        self, db: Database, archive: dict[str, str]
    ) -> None:
        info = make_cohort(db, select_studies(db, StudyQuery()))
        begin_run(db, info.id, "r1")
        (first_id, _), (second_id, _), *_ = pending_items(db, info.id)
        assert claim_item(db, info.id, first_id, "r1").item is not None
        begin_run(db, info.id, "r2", stale_after_seconds=0)
        claim = claim_item(db, info.id, second_id, "r1")
        assert claim.item is None and not claim.owner

    def test_failed_chunk_leaves_no_study_running(
        self, db: Database, archive: dict[str, str]
    ) -> None:
        info = make_cohort(db, select_studies(db, StudyQuery()))
        begin_run(db, info.id, "r")
        ids = [item_id for item_id, _ in pending_items(db, info.id)]
        assert claim_item(db, info.id, ids[0], "r").item is not None
        assert fail_running_items(db, ids[:3], "run error after retries: OSError") == 1
        assert get_cohort(db, "c1").counts == {"failed": 1, "pending": 3}


class TestAnalysedByFilter:
    def test_analysed_and_not_analysed_by_a_model(
        self, db: Database, archive: dict[str, str]
    ) -> None:
        from archive.results import record_result
        from pipeline.findings import ModelIdentity, ModelResult

        with db.reader() as session:
            study_pk = session.scalar(
                select(Study.id).where(Study.study_instance_uid == archive["chest_2025"])
            )
        record_result(
            db,
            study_pk=study_pk,
            fingerprint="f" * 64,
            result=ModelResult(ModelIdentity("ich", "1.0", "0" * 64), "1.2.3"),
            mode="active",
        )
        assert uids(select_studies(db, StudyQuery(analysed_by="ich"))) == [archive["chest_2025"]]
        assert uids(select_studies(db, StudyQuery(analysed_by="ich:1.0"))) == [
            archive["chest_2025"]
        ]
        assert uids(select_studies(db, StudyQuery(analysed_by="ich:2.0"))) == []
        assert archive["chest_2025"] not in uids(
            select_studies(db, StudyQuery(not_analysed_by="ich"))
        )
        assert len(select_studies(db, StudyQuery(not_analysed_by="ich:2.0"))) == 4


class TestMigration:
    def test_0006_downgrades_and_upgrades_again(self, db: Database) -> None:
        from alembic import command
        from sqlalchemy import inspect

        from archive.db import alembic_config

        config = alembic_config(db.url)
        command.downgrade(config, "0005_results")
        assert "cohort" not in inspect(db.write_engine).get_table_names()
        command.upgrade(config, "head")
        tables = inspect(db.write_engine).get_table_names()
        assert {"cohort", "cohort_item"} <= set(tables)
        uniques = inspect(db.write_engine).get_unique_constraints("cohort_item")
        assert any(set(u["column_names"]) == {"cohort_id", "study_pk"} for u in uniques)
