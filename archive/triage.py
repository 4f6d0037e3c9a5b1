"""Triage bookkeeping: the study's triage state and the outbox of ready studies.

Accepts decisions ("this study is stable", "this job finished with this
outcome") and records them transactionally in the index: a study becomes
ready together with its job row (so a trigger is never lost or doubled), jobs
are claimed with a lease (so a job whose node died runs again), and a result
only changes the study's state if it belongs to the study's current
generation (so the newest analysis always wins). Never runs a model and never
talks to Prefect: flows/ calls these functions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import Connection, and_, or_, select, update

from archive.db import Database, upsert_insert
from archive.index import Study, StudyTriage, TriageJob, utcnow

logger = logging.getLogger(__name__)

REASON_MAX_LENGTH = 1024


class TriageStateValues(StrEnum):
    """Where a ready study stands. "Waiting for images" is derived, not stored."""

    QUEUED = "queued"
    ANALYSING = "analysing"
    TRIAGED = "triaged"
    NO_APPLICABLE_MODEL = "no_applicable_model"
    FAILED = "failed"


FINAL_STATES = frozenset(
    {
        TriageStateValues.TRIAGED,
        TriageStateValues.NO_APPLICABLE_MODEL,
        TriageStateValues.FAILED,
    }
)


class JobStatusValues(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class StableCandidate:
    """A study with arrivals since it was last ready, and when the latest one came."""

    study_pk: int
    study_instance_uid: str
    last_received_at: datetime


@dataclass(frozen=True)
class ClaimedJob:
    """A triage job this process now owns until its lease runs out."""

    id: int
    study_pk: int
    study_instance_uid: str
    generation: int
    attempts: int
    lease_expires_at: datetime


@dataclass(frozen=True)
class TriageOutcome:
    """How an analysis ended; exactly one of the final states."""

    state: TriageStateValues
    failure_reason: str | None = None
    priority_class: str | None = None
    priority_score: float | None = None
    priority_reason: str | None = None
    sr_sop_instance_uid: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", TriageStateValues(self.state))
        if self.state not in FINAL_STATES:
            raise ValueError(f"TriageOutcome.state must be a final state, got {self.state}")
        if self.state is TriageStateValues.FAILED and not self.failure_reason:
            raise ValueError("TriageOutcome.failure_reason is required for a failed analysis")


def stable_candidates(db: Database, *, since: datetime | None) -> list[StableCandidate]:
    """Studies with instances that arrived after their last "ready", newest arrival >= `since`.

    `since` limits the scan to recent arrivals (indexed); None scans everything
    (at start-up, to catch what arrived while the node was down).
    """
    triage = StudyTriage.__table__
    study = Study.__table__
    query = (
        select(study.c.id, study.c.study_instance_uid, study.c.last_received_at)
        .select_from(study.outerjoin(triage, triage.c.study_pk == study.c.id))
        .where(or_(triage.c.study_pk.is_(None), study.c.last_received_at > triage.c.ready_at))
    )
    if since is not None:
        query = query.where(study.c.last_received_at >= since)
    with db.reader() as session:
        return [StableCandidate(*row) for row in session.execute(query)]


def mark_ready(db: Database, candidate: StableCandidate, now: datetime | None = None) -> int | None:
    """Declare a study ready: new generation, state queued, one outbox job, one transaction.

    Returns the new generation, or None if an instance arrived since the
    candidate was read (the study is not stable after all).
    """
    now = now or utcnow()
    study = Study.__table__
    with db.write_connection() as conn:
        locked = select(study.c.last_received_at).where(study.c.id == candidate.study_pk)
        if db.dialect == "postgresql":
            locked = locked.with_for_update()
        last = conn.execute(locked).scalar_one()
        if last != candidate.last_received_at:
            return None
        current = conn.execute(
            select(StudyTriage.generation).where(StudyTriage.study_pk == candidate.study_pk)
        ).scalar_one_or_none()
        generation = (current or 0) + 1
        values = {
            "generation": generation,
            "state": TriageStateValues.QUEUED.value,
            "ready_at": candidate.last_received_at,
            "started_at": None,
            "finished_at": None,
            "failure_reason": None,
            "updated_at": now,
        }
        if current is None:
            conn.execute(
                upsert_insert(db.dialect)(StudyTriage.__table__).values(
                    study_pk=candidate.study_pk, **values
                )
            )
        else:
            conn.execute(
                update(StudyTriage.__table__)
                .where(StudyTriage.study_pk == candidate.study_pk)
                .values(**values)
            )
        conn.execute(
            upsert_insert(db.dialect)(TriageJob.__table__)
            .values(
                study_pk=candidate.study_pk,
                generation=generation,
                status=JobStatusValues.PENDING.value,
                created_at=now,
                attempts=0,
            )
            .on_conflict_do_nothing(index_elements=["study_pk", "generation"])
        )
    logger.info("study %s ready (generation %d)", candidate.study_instance_uid, generation)
    return generation


def claim_next_job(
    db: Database, owner: str, *, lease_seconds: float, now: datetime | None = None
) -> ClaimedJob | None:
    """Take the oldest pending job (or one whose lease ran out) and lease it to `owner`."""
    now = now or utcnow()
    job = TriageJob.__table__
    with db.write_connection() as conn:
        query = (
            select(job.c.id)
            .where(
                or_(
                    job.c.status == JobStatusValues.PENDING.value,
                    and_(
                        job.c.status == JobStatusValues.RUNNING.value,
                        job.c.lease_expires_at < now,
                    ),
                )
            )
            .order_by(job.c.created_at, job.c.id)
            .limit(1)
        )
        if db.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        job_id = conn.execute(query).scalar_one_or_none()
        if job_id is None:
            return None
        lease_expires_at = now + timedelta(seconds=lease_seconds)
        conn.execute(
            update(job)
            .where(job.c.id == job_id)
            .values(
                status=JobStatusValues.RUNNING.value,
                claimed_by=owner,
                claimed_at=now,
                lease_expires_at=lease_expires_at,
                attempts=job.c.attempts + 1,
            )
        )
        row = conn.execute(
            select(job.c.study_pk, job.c.generation, job.c.attempts, Study.study_instance_uid)
            .join(Study.__table__, Study.id == job.c.study_pk)
            .where(job.c.id == job_id)
        ).one()
    return ClaimedJob(
        job_id, row.study_pk, row.study_instance_uid, row.generation, row.attempts, lease_expires_at
    )


def release_jobs_of(db: Database, owner: str) -> int:
    """Put back the running jobs of `owner` (called when that owner restarts)."""
    job = TriageJob.__table__
    with db.write_connection() as conn:
        result = conn.execute(
            update(job)
            .where(job.c.claimed_by == owner, job.c.status == JobStatusValues.RUNNING.value)
            .values(status=JobStatusValues.PENDING.value, lease_expires_at=None)
        )
    if result.rowcount:
        logger.warning("re-queued %d triage job(s) interrupted by a restart", result.rowcount)
    return int(result.rowcount or 0)


def _current(conn: Connection, job: ClaimedJob) -> bool:
    generation = conn.execute(
        select(StudyTriage.generation).where(StudyTriage.study_pk == job.study_pk)
    ).scalar_one_or_none()
    return generation == job.generation


def start_analysis(db: Database, job: ClaimedJob, now: datetime | None = None) -> bool:
    """Mark the study analysing, if the job is still its current generation."""
    now = now or utcnow()
    with db.write_connection() as conn:
        if not _current(conn, job):
            return False
        conn.execute(
            update(StudyTriage.__table__)
            .where(
                StudyTriage.study_pk == job.study_pk,
                StudyTriage.generation == job.generation,
            )
            .values(state=TriageStateValues.ANALYSING.value, started_at=now, updated_at=now)
        )
    return True


def finish_job(
    db: Database, job: ClaimedJob, outcome: TriageOutcome, now: datetime | None = None
) -> bool:
    """Record a job's outcome; the study's state changes only for its current generation.

    Returns True if the study's state was updated (False: superseded by a newer
    generation, whose own job will set the state).
    """
    now = now or utcnow()
    reason = (outcome.failure_reason or "")[:REASON_MAX_LENGTH] or None
    with db.write_connection() as conn:
        conn.execute(
            update(TriageJob.__table__)
            .where(TriageJob.id == job.id)
            .values(
                status=(
                    JobStatusValues.FAILED.value
                    if outcome.state is TriageStateValues.FAILED
                    else JobStatusValues.DONE.value
                ),
                finished_at=now,
                error=reason,
                lease_expires_at=None,
            )
        )
        updated = conn.execute(
            update(StudyTriage.__table__)
            .where(
                StudyTriage.study_pk == job.study_pk,
                StudyTriage.generation == job.generation,
            )
            .values(
                state=outcome.state.value,
                finished_at=now,
                failure_reason=reason,
                priority_class=outcome.priority_class,
                priority_score=outcome.priority_score,
                priority_reason=(outcome.priority_reason or "")[:REASON_MAX_LENGTH] or None,
                sr_sop_instance_uid=outcome.sr_sop_instance_uid,
                updated_at=now,
            )
        ).rowcount
    logger.info(
        "study %s generation %d: %s%s",
        job.study_instance_uid,
        job.generation,
        outcome.state.value,
        "" if updated else " (superseded by a newer generation)",
    )
    return bool(updated)


def requeue_job(db: Database, job: ClaimedJob) -> bool:
    """Give a running job back to the queue (its run failed before recording an outcome)."""
    table = TriageJob.__table__
    with db.write_connection() as conn:
        result = conn.execute(
            update(table)
            .where(table.c.id == job.id, table.c.status == JobStatusValues.RUNNING.value)
            .values(status=JobStatusValues.PENDING.value, lease_expires_at=None)
        )
    return bool(result.rowcount)


def close_superseded_job(db: Database, job: ClaimedJob, now: datetime | None = None) -> None:
    """Close a job whose study became ready again before it ran (the newer job analyses it)."""
    table = TriageJob.__table__
    with db.write_connection() as conn:
        conn.execute(
            update(table)
            .where(table.c.id == job.id)
            .values(
                status=JobStatusValues.DONE.value,
                finished_at=now or utcnow(),
                error="superseded by a newer generation before it started",
                lease_expires_at=None,
            )
        )
    logger.info(
        "study %s generation %d superseded before analysis", job.study_instance_uid, job.generation
    )
