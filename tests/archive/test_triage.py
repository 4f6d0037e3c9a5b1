"""Triage bookkeeping and study completeness, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from archive.db import Database
from archive.index import Study, StudyTriage, TriageJob, utcnow
from archive.ingest import Ingest
from archive.stability import DeliveryTracker, StabilityMonitor
from archive.store import FileStore
from archive.triage import (
    JobStatusValues,
    TriageOutcome,
    TriageStateValues,
    claim_next_job,
    finish_job,
    mark_ready,
    release_jobs_of,
    stable_candidates,
    start_analysis,
)
from tests.dicom_factory import ct_dataset, part10_bytes

QUIET = 5.0
RELEASE_QUIET = 0.5


@pytest.fixture
def ingest(db: Database, tmp_path: Path) -> Ingest:
    return Ingest(db, FileStore(tmp_path / "store"))


def send_study(ingest: Ingest, study_uid: str | None = None, count: int = 2) -> str:
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    for i in range(count):
        ds = ct_dataset(study_instance_uid=study_uid, series_instance_uid=series_uid, seed=i)
        assert ingest.store(part10_bytes(ds)).ok
    return study_uid


def last_received(db: Database, study_uid: str) -> datetime:
    with db.reader() as session:
        return session.scalars(
            select(Study.last_received_at).where(Study.study_instance_uid == study_uid)
        ).one()


def triage_row(db: Database, study_uid: str) -> StudyTriage | None:
    with db.reader() as session:
        return session.scalars(
            select(StudyTriage).join(Study).where(Study.study_instance_uid == study_uid)
        ).one_or_none()


def jobs(db: Database) -> list[TriageJob]:
    with db.reader() as session:
        return list(session.scalars(select(TriageJob).order_by(TriageJob.id)))


def monitor(db: Database, tracker: DeliveryTracker | None = None) -> StabilityMonitor:
    return StabilityMonitor(
        db,
        tracker or DeliveryTracker(),
        quiet_seconds=QUIET,
        release_quiet_seconds=RELEASE_QUIET,
    )


class TestStabilityMonitor:
    def test_study_is_not_ready_before_the_quiet_period(self, db: Database, ingest: Ingest) -> None:
        study_uid = send_study(ingest)
        arrived = last_received(db, study_uid)
        assert monitor(db).tick(now=arrived + timedelta(seconds=QUIET - 1)) == []
        assert triage_row(db, study_uid) is None
        assert jobs(db) == []

    def test_study_is_ready_after_the_quiet_period_with_one_job(
        self, db: Database, ingest: Ingest
    ) -> None:
        study_uid = send_study(ingest)
        arrived = last_received(db, study_uid)
        watcher = monitor(db)
        marked = watcher.tick(now=arrived + timedelta(seconds=QUIET + 0.1))
        assert [(c.study_instance_uid, g) for c, g in marked] == [(study_uid, 1)]
        row = triage_row(db, study_uid)
        assert row is not None
        assert row.state == TriageStateValues.QUEUED
        assert row.generation == 1
        assert row.ready_at == arrived
        # A second scan finds nothing new: the trigger is never doubled.
        assert watcher.tick(now=arrived + timedelta(seconds=QUIET + 10)) == []
        assert [(j.generation, j.status) for j in jobs(db)] == [(1, JobStatusValues.PENDING)]

    def test_release_of_the_only_sender_shortens_the_quiet_period(
        self, db: Database, ingest: Ingest
    ) -> None:
        study_uid = send_study(ingest)
        arrived = last_received(db, study_uid)
        tracker = DeliveryTracker()
        tracker.report({"type": "delivering", "association": "a1", "study": study_uid})
        tracker.report(
            {"type": "closed", "association": "a1", "studies": [study_uid], "released": True},
            now=arrived + timedelta(seconds=0.1),
        )
        marked = monitor(db, tracker).tick(now=arrived + timedelta(seconds=RELEASE_QUIET + 0.1))
        assert [c.study_instance_uid for c, _ in marked] == [study_uid]

    def test_release_does_not_shorten_while_another_association_sends(
        self, db: Database, ingest: Ingest
    ) -> None:
        study_uid = send_study(ingest)
        arrived = last_received(db, study_uid)
        tracker = DeliveryTracker()
        for association in ("a1", "a2"):
            tracker.report({"type": "delivering", "association": association, "study": study_uid})
        tracker.report(
            {"type": "closed", "association": "a1", "studies": [study_uid], "released": True},
            now=arrived,
        )
        assert monitor(db, tracker).tick(now=arrived + timedelta(seconds=RELEASE_QUIET + 1)) == []

    def test_aborted_association_does_not_shorten(self, db: Database, ingest: Ingest) -> None:
        study_uid = send_study(ingest)
        arrived = last_received(db, study_uid)
        tracker = DeliveryTracker()
        tracker.report({"type": "delivering", "association": "a1", "study": study_uid})
        tracker.report(
            {"type": "closed", "association": "a1", "studies": [study_uid], "released": False},
            now=arrived,
        )
        assert monitor(db, tracker).tick(now=arrived + timedelta(seconds=RELEASE_QUIET + 1)) == []

    def test_late_instance_makes_a_new_generation(self, db: Database, ingest: Ingest) -> None:
        study_uid = send_study(ingest)
        watcher = monitor(db)
        watcher.tick(now=last_received(db, study_uid) + timedelta(seconds=QUIET + 1))
        send_study(ingest, study_uid, count=1)
        late = last_received(db, study_uid)
        assert watcher.tick(now=late + timedelta(seconds=1)) == []
        marked = watcher.tick(now=late + timedelta(seconds=QUIET + 1))
        assert [g for _, g in marked] == [2]
        assert triage_row(db, study_uid).generation == 2  # type: ignore[union-attr]
        assert [j.generation for j in jobs(db)] == [1, 2]

    def test_internal_store_does_not_retrigger(self, db: Database, ingest: Ingest) -> None:
        study_uid = send_study(ingest)
        arrived = last_received(db, study_uid)
        watcher = monitor(db)
        watcher.tick(now=arrived + timedelta(seconds=QUIET + 1))
        result = ct_dataset(study_instance_uid=study_uid, modality="SR")
        assert ingest.store(part10_bytes(result), internal=True).ok
        assert last_received(db, study_uid) == arrived
        assert stable_candidates(db, since=None) == []

    def test_ready_is_refused_if_an_instance_arrived_meanwhile(
        self, db: Database, ingest: Ingest
    ) -> None:
        study_uid = send_study(ingest)
        [candidate] = stable_candidates(db, since=None)
        send_study(ingest, study_uid, count=1)
        assert mark_ready(db, candidate) is None
        assert jobs(db) == []


class TestTriageJobs:
    @pytest.fixture
    def ready_study(self, db: Database, ingest: Ingest) -> str:
        study_uid = send_study(ingest)
        monitor(db).tick(now=last_received(db, study_uid) + timedelta(seconds=QUIET + 1))
        return study_uid

    def test_claim_leases_the_job_once(self, db: Database, ready_study: str) -> None:
        now = utcnow()
        job = claim_next_job(db, "node-a", lease_seconds=60, now=now)
        assert job is not None
        assert job.study_instance_uid == ready_study
        assert job.generation == 1
        assert job.attempts == 1
        assert claim_next_job(db, "node-b", lease_seconds=60, now=now) is None

    def test_expired_lease_is_claimed_again(self, db: Database, ready_study: str) -> None:
        now = utcnow()
        claim_next_job(db, "node-a", lease_seconds=60, now=now)
        again = claim_next_job(db, "node-b", lease_seconds=60, now=now + timedelta(seconds=61))
        assert again is not None
        assert again.attempts == 2

    def test_restart_requeues_the_owners_running_jobs(self, db: Database, ready_study: str) -> None:
        claim_next_job(db, "node-a", lease_seconds=600)
        assert release_jobs_of(db, "node-a") == 1
        job = claim_next_job(db, "node-a", lease_seconds=600)
        assert job is not None and job.attempts == 2

    def test_finish_sets_the_final_state(self, db: Database, ready_study: str) -> None:
        job = claim_next_job(db, "node-a", lease_seconds=60)
        assert job is not None
        assert start_analysis(db, job)
        assert triage_row(db, ready_study).state == TriageStateValues.ANALYSING  # type: ignore[union-attr]
        outcome = TriageOutcome(
            TriageStateValues.TRIAGED,
            priority_class="STAT",
            priority_score=91.0,
            priority_reason="STAT: Hemorrhage present",
            sr_sop_instance_uid="1.2.3",
        )
        assert finish_job(db, job, outcome)
        row = triage_row(db, ready_study)
        assert row is not None
        assert (row.state, row.priority_class, row.priority_score) == ("triaged", "STAT", 91.0)
        assert [j.status for j in jobs(db)] == [JobStatusValues.DONE]

    def test_failure_is_recorded_with_its_reason(self, db: Database, ready_study: str) -> None:
        job = claim_next_job(db, "node-a", lease_seconds=60)
        assert job is not None
        finish_job(db, job, TriageOutcome(TriageStateValues.FAILED, failure_reason="model raised"))
        row = triage_row(db, ready_study)
        assert row is not None
        assert (row.state, row.failure_reason) == ("failed", "model raised")
        assert [(j.status, j.error) for j in jobs(db)] == [(JobStatusValues.FAILED, "model raised")]

    def test_result_of_an_older_generation_does_not_overwrite_the_newer(
        self, db: Database, ingest: Ingest, ready_study: str
    ) -> None:
        old = claim_next_job(db, "node-a", lease_seconds=60)
        assert old is not None
        send_study(ingest, ready_study, count=1)
        monitor(db).tick(now=last_received(db, ready_study) + timedelta(seconds=QUIET + 1))
        assert not finish_job(
            db, old, TriageOutcome(TriageStateValues.TRIAGED, priority_class="ROUTINE")
        )
        row = triage_row(db, ready_study)
        assert row is not None
        assert (row.generation, row.state) == (2, TriageStateValues.QUEUED)
        assert not start_analysis(db, old)

    def test_failed_outcome_needs_a_reason(self) -> None:
        with pytest.raises(ValueError, match="failure_reason is required"):
            TriageOutcome(TriageStateValues.FAILED)

    def test_outcome_must_be_final(self) -> None:
        with pytest.raises(ValueError, match="must be a final state"):
            TriageOutcome(TriageStateValues.ANALYSING)

    def test_claim_order_is_oldest_first(self, db: Database, ingest: Ingest) -> None:
        first, second = send_study(ingest), send_study(ingest)
        watcher = monitor(db)
        latest = max(last_received(db, first), last_received(db, second))
        watcher.tick(now=latest + timedelta(seconds=QUIET + 1))
        with db.write_connection() as conn:
            conn.execute(
                update(TriageJob.__table__).values(created_at=utcnow() - timedelta(minutes=1))
            )
        claimed = [claim_next_job(db, "n", lease_seconds=60) for _ in range(2)]
        assert {c.study_instance_uid for c in claimed if c} == {first, second}


class TestDeliveryTrackerReleaseRace:
    def test_release_reported_after_an_unreleased_close_still_counts(self) -> None:
        # pynetdicom sends A-RELEASE-RP before it sets is_released: the connection
        # close (another thread) may report "not released" before EVT_RELEASED does.
        tracker = DeliveryTracker()
        arrived = utcnow()
        tracker.report({"type": "delivering", "association": "a1", "study": "1.2.3"})
        tracker.report(
            {"type": "closed", "association": "a1", "studies": ["1.2.3"], "released": False},
            now=arrived + timedelta(seconds=0.1),
        )
        assert not tracker.sender_done("1.2.3", arrived)
        tracker.report(
            {"type": "released", "association": "a1", "studies": ["1.2.3"], "released": True},
            now=arrived + timedelta(seconds=0.1),
        )
        assert tracker.sender_done("1.2.3", arrived)
