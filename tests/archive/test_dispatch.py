"""The triage dispatcher: bounded concurrency, re-queue and give-up of failing runs, workers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from archive.config import Settings
from archive.db import Database
from archive.dispatch import Dispatcher, worker_command
from archive.index import Study, StudyTriage, TriageJob
from archive.ingest import Ingest
from archive.store import FileStore
from archive.triage import (
    ClaimedJob,
    TriageOutcome,
    TriageStateValues,
    finish_job,
    mark_ready,
    stable_candidates,
)
from tests.dicom_factory import ct_dataset, part10_bytes


def ready_studies(db: Database, tmp_path: Path, count: int) -> list[str]:
    ingest = Ingest(db, FileStore(tmp_path / "store", fsync=False))
    uids = []
    for _ in range(count):
        ds = ct_dataset(study_instance_uid=generate_uid())
        assert ingest.store(part10_bytes(ds)).ok
        uids.append(str(ds.StudyInstanceUID))
    for candidate in stable_candidates(db, since=None):
        assert mark_ready(db, candidate) is not None
    return uids


def wait_until(condition, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def states(db: Database) -> dict[str, tuple[str, str | None]]:
    with db.reader() as session:
        rows = session.execute(
            select(Study.study_instance_uid, StudyTriage.state, StudyTriage.failure_reason).join(
                StudyTriage, StudyTriage.study_pk == Study.id
            )
        ).all()
    return {uid: (state, reason) for uid, state, reason in rows}


class TestDispatcher:
    def test_runs_at_most_concurrency_jobs_at_once_and_all_of_them(
        self, db: Database, tmp_path: Path
    ) -> None:
        uids = ready_studies(db, tmp_path, 5)
        settings = Settings(data_dir=tmp_path, triage_concurrency=2, node_name="n1")
        running: set[int] = set()
        peak = 0
        lock = threading.Lock()

        def runner(job: ClaimedJob) -> None:
            nonlocal peak
            with lock:
                running.add(job.id)
                peak = max(peak, len(running))
            time.sleep(0.2)
            finish_job(db, job, TriageOutcome(TriageStateValues.NO_APPLICABLE_MODEL))
            with lock:
                running.discard(job.id)

        dispatcher = Dispatcher(settings, db, runner, poll_seconds=0.05)
        dispatcher.start()
        try:
            wait_until(
                lambda: (
                    all(s == "no_applicable_model" for s, _ in states(db).values())
                    and len(states(db)) == len(uids)
                )
            )
        finally:
            dispatcher.stop()
        assert peak == 2

    def test_failing_run_is_requeued_then_fails_the_study_with_the_reason(
        self, db: Database, tmp_path: Path
    ) -> None:
        [uid] = ready_studies(db, tmp_path, 1)
        settings = Settings(data_dir=tmp_path, triage_max_attempts=3, node_name="n1")
        calls: list[int] = []

        def runner(job: ClaimedJob) -> None:
            calls.append(job.attempts)
            raise ConnectionError("Prefect API unreachable")

        dispatcher = Dispatcher(settings, db, runner, poll_seconds=0.05)
        dispatcher.start()
        try:
            wait_until(lambda: states(db)[uid][0] == TriageStateValues.FAILED)
        finally:
            dispatcher.stop()
        assert calls == [1, 2, 3]
        _, reason = states(db)[uid]
        assert reason == "triage run failed 3 times: ConnectionError: Prefect API unreachable"
        with db.reader() as session:
            assert session.scalars(select(TriageJob.status)).all() == ["failed"]


class TestWorkerCommand:
    def test_worker_serves_the_configured_pool_with_process_workers(self, tmp_path: Path) -> None:
        settings = Settings(
            data_dir=tmp_path,
            prefect_api_url="http://prefect.example:4200/api",
            prefect_work_pool="radiology",
            triage_concurrency=3,
        )
        argv, env = worker_command(settings)
        assert argv[1:] == [
            *("worker", "start", "--pool", "radiology"),
            *("--type", "process", "--limit", "3"),
        ]
        assert env["PREFECT_API_URL"] == "http://prefect.example:4200/api"
        assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"

    def test_worker_without_prefect_server_is_refused(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
        with pytest.raises(ValueError, match="a worker needs a Prefect server"):
            worker_command(Settings(data_dir=tmp_path))
