"""The triage dispatcher: claims ready studies from the outbox and runs their flow.

Accepts the outbox (:mod:`archive.triage`: one job per study generation) and
produces Prefect flow runs of ``flows.triage.triage_study``, one per job, in
one of two modes:

- **embedded** (no Prefect API configured): the node starts one managed
  ``prefect server`` child (:mod:`archive.prefect_server`) and runs the flow
  in-process against it, at most ``triage_concurrency`` at a time;
- **distributed** (``PREFECT_API_URL`` or ``prefect_api_url`` set): the node
  makes sure the work pool ``prefect_work_pool`` exists with the queues
  ``triage`` (priority 1) and ``cohort`` (priority 10) and the deployment
  ``triage_study/triage``, and submits one run per job to the ``triage``
  queue; ``pacs-triage worker`` (a Prefect process worker) executes it on any
  machine that shares the index and the file store.

A job is leased while it runs; a node that dies leaves its jobs to be claimed
again (at restart, or by another node when the lease runs out), and the flow
is idempotent, so each study ends in exactly one final state. Never analyses
anything itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from archive.config import Settings
from archive.db import Database
from archive.ingest import Ingest
from archive.prefect_server import ManagedPrefectServer
from archive.store import FileStore
from archive.triage import (
    ClaimedJob,
    TriageOutcome,
    TriageStateValues,
    claim_next_job,
    finish_job,
    requeue_job,
)

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
FLOW_NAME = "triage_study"
DEPLOYMENT_NAME = "triage"
TRIAGE_QUEUE = "triage"
COHORT_QUEUE = "cohort"
QUEUE_PRIORITIES = {TRIAGE_QUEUE: 1, COHORT_QUEUE: 10}
"""Work queues of the pool; a worker serves a lower number first (clinical before research)."""


class EmbeddedRunner:
    """Runs the flow in this process against the managed Prefect server."""

    def __init__(
        self,
        settings: Settings,
        server: ManagedPrefectServer,
        *,
        db: Database | None = None,
        file_store: FileStore | None = None,
        ingest: Ingest | None = None,
    ) -> None:
        self.settings = settings
        self.server = server
        self.db = db
        self.file_store = file_store
        self.ingest = ingest
        self._configured = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the Prefect server (a child process; :meth:`warm_up` waits for it)."""
        self.server.start()

    def warm_up(self) -> None:
        """Import Prefect, torch and MONAI and discover the models, so the first study
        does not pay for it; runs in a thread while the server starts."""
        try:
            self._configure()
            self.server.wait()
        except Exception:
            logger.exception("triage warm-up failed; the first flow run will retry")

    def _configure(self) -> None:
        # One lock around the lazy imports: importing highdicom/MONAI from two
        # threads at once can meet a partially initialised module.
        with self._lock:
            if self._configured:
                return
            from flows import runtime
            from flows.triage import triage_study  # noqa: F401

            runtime.configure(
                runtime.TriageRuntime.from_settings(
                    self.settings, db=self.db, file_store=self.file_store, ingest=self.ingest
                )
            )
            self._configured = True

    def __call__(self, job: ClaimedJob) -> None:
        if not self.server.wait():
            error = self.server.error or "Prefect server unavailable"
            self.server.restart_if_dead()  # the job is re-queued and finds it restarted
            raise RuntimeError(error)
        self._configure()
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from flows.triage import triage_study

        with temporary_settings(updates={PREFECT_API_URL: self.server.api_url}):
            asyncio.run(triage_study(job.id))

    def stop(self) -> None:
        self.server.stop()


def deploy_on_work_pool(flow: Any, entrypoint: str, name: str, work_pool: str, queue: str) -> str:
    """Create (idempotently) the work pool, its queues and a deployment of `flow`; return its id.

    The pool gets every queue of :data:`QUEUE_PRIORITIES` (clinical before
    research), whichever flow is deployed first. Uses the Prefect API of the
    current settings (``PREFECT_API_URL``).
    """
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    async def pool_and_queues() -> None:
        async with get_client() as client:
            with contextlib.suppress(ObjectAlreadyExists):
                await client.create_work_pool(WorkPoolCreate(name=work_pool, type="process"))
            existing = {q.name: q for q in await client.read_work_queues(work_pool_name=work_pool)}
            for queue_name, priority in QUEUE_PRIORITIES.items():
                if queue_name not in existing:
                    # Another node or a cohort submission may create it at the same time.
                    with contextlib.suppress(ObjectAlreadyExists):
                        await client.create_work_queue(
                            name=queue_name, work_pool_name=work_pool, priority=priority
                        )
                elif existing[queue_name].priority != priority:
                    await client.update_work_queue(id=existing[queue_name].id, priority=priority)

    asyncio.run(pool_and_queues())
    deployment_id = flow.from_source(source=str(REPO_ROOT), entrypoint=entrypoint).deploy(
        name=name,
        work_pool_name=work_pool,
        work_queue_name=queue,
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )
    return str(deployment_id)


def ensure_deployment(work_pool: str) -> str:
    """Create (idempotently) the work pool, its queues and the triage deployment; return its id."""
    from flows.triage import triage_study

    return deploy_on_work_pool(
        triage_study, "flows/triage.py:triage_study", DEPLOYMENT_NAME, work_pool, TRIAGE_QUEUE
    )


class DistributedRunner:
    """Submits one flow run per job to the ``triage`` queue of the work pool."""

    def __init__(self, settings: Settings, api_url: str) -> None:
        self.settings = settings
        self.api_url = api_url
        self.deployment_id: str | None = None
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Create the work pool, queues and deployment before the first study."""
        try:
            with self._lock:
                from prefect.settings import PREFECT_API_URL, temporary_settings

                with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
                    self._ensure()
        except Exception:
            logger.exception("could not create the triage deployment yet; will retry")

    def _ensure(self) -> None:
        if self.deployment_id is None:
            self.deployment_id = ensure_deployment(self.settings.prefect_work_pool)
            logger.info(
                "triage deployment %s/%s on work pool %s",
                FLOW_NAME,
                DEPLOYMENT_NAME,
                self.settings.prefect_work_pool,
            )

    def __call__(self, job: ClaimedJob) -> None:
        with self._lock:
            from prefect.deployments import run_deployment
            from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            with self._lock:
                self._ensure()
            run = run_deployment(
                name=f"{FLOW_NAME}/{DEPLOYMENT_NAME}",
                parameters={"job_id": job.id},
                timeout=0,
                work_queue_name=TRIAGE_QUEUE,
                idempotency_key=f"triage-job-{job.id}-attempt-{job.attempts}",
                tags=["triage"],
            )
        logger.info(
            "study %s generation %d submitted as flow run %s",
            job.study_instance_uid,
            job.generation,
            getattr(run, "id", run),
        )

    def stop(self) -> None:
        pass


Runner = Callable[[ClaimedJob], None]


class Dispatcher:
    """Claims triage jobs and hands them to a runner, at most `concurrency` at a time.

    Parameters
    ----------
    settings : Settings
        ``node_name`` (owner of the claims), ``triage_lease_seconds``,
        ``triage_concurrency``, ``triage_max_attempts``.
    db : Database
        The index holding the outbox.
    runner : callable
        Runs (embedded) or submits (distributed) the flow for one job. An
        exception means the run did not record an outcome: the job goes back
        to the queue, or fails the study after ``triage_max_attempts``.
    holds_slot : bool
        True when the runner returns only once the flow finished (embedded);
        False when it only submits (distributed: the workers bound concurrency).
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        runner: Any,
        *,
        holds_slot: bool = True,
        poll_seconds: float = 1.0,
    ) -> None:
        self.settings = settings
        self.db = db
        self.runner = runner
        self.holds_slot = holds_slot
        self.poll_seconds = poll_seconds
        self.concurrency = settings.triage_concurrency
        self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="triage")
        self._active = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_settings(
        cls,
        settings: Settings,
        db: Database,
        *,
        file_store: FileStore | None = None,
        ingest: Ingest | None = None,
    ) -> Dispatcher:
        """The dispatcher of the mode the settings select (see the module docstring).

        In embedded mode the flow runs share the node's `db`, `file_store` and `ingest`.
        """
        api_url = settings.resolved_prefect_api_url
        if api_url:
            logger.info("triage: distributed mode, Prefect API %s", api_url)
            return cls(settings, db, DistributedRunner(settings, api_url), holds_slot=False)
        server = ManagedPrefectServer(settings.data_dir / "prefect")
        return cls(
            settings,
            db,
            EmbeddedRunner(settings, server, db=db, file_store=file_store, ingest=ingest),
        )

    def prepare(self) -> None:
        """Start what takes long (the managed Prefect server); call first at node start."""
        start = getattr(self.runner, "start", None)
        if start is not None:
            start()

    def start(self) -> None:
        """Warm up the runner and start claiming jobs (call once the node has started:
        the background imports must not race the node's own)."""
        warm_up = getattr(self.runner, "warm_up", None)
        if warm_up is not None:
            threading.Thread(target=warm_up, name="triage-warm-up", daemon=True).start()
        self._thread = threading.Thread(target=self._run, name="triage-dispatch", daemon=True)
        self._thread.start()

    def wake(self, *args: object) -> None:
        """Look for jobs now (a study just became ready)."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._executor.shutdown(wait=True, cancel_futures=True)
        stop = getattr(self.runner, "stop", None)
        if stop is not None:
            stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._claim_available()
            except Exception:
                logger.exception("triage dispatch failed; retrying")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def _claim_available(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._active >= self.concurrency:
                    return
            job = claim_next_job(
                self.db, self.settings.node_name, lease_seconds=self.settings.triage_lease_seconds
            )
            if job is None:
                return
            with self._lock:
                self._active += 1
            self._executor.submit(self._execute, job)

    def _execute(self, job: ClaimedJob) -> None:
        try:
            self.runner(job)
        except Exception as exc:
            self._run_failed(job, exc)
        finally:
            with self._lock:
                self._active -= 1
            self._wake.set()

    def _run_failed(self, job: ClaimedJob, exc: Exception) -> None:
        logger.error(
            "triage run of study %s (job %d, attempt %d) failed: %s: %s",
            job.study_instance_uid,
            job.id,
            job.attempts,
            type(exc).__name__,
            str(exc)[:300],
        )
        try:
            if job.attempts >= self.settings.triage_max_attempts:
                finish_job(
                    self.db,
                    job,
                    TriageOutcome(
                        TriageStateValues.FAILED,
                        failure_reason=(
                            f"triage run failed {job.attempts} times: "
                            f"{type(exc).__name__}: {str(exc)[:300]}"
                        ),
                    ),
                )
            else:
                requeue_job(self.db, job)
        except Exception:
            logger.exception("could not record the failed job %d; its lease will expire", job.id)


WORKER_QUERY_SECONDS = "1"
"""How often an idle worker asks for runs (Prefect's default, 10 s, would add to time to triage)."""


def worker_command(
    settings: Settings, *, limit: int | None = None
) -> tuple[list[str], dict[str, str]]:
    """The ``prefect worker start`` command line and environment of a triage worker.

    The worker serves the work pool's queues in priority order (``triage``
    before ``cohort``) and runs each flow in a new process that reads the same
    ``PACS_TRIAGE_*`` settings as the node, so it must see the same index and
    file store.
    """
    api_url = settings.resolved_prefect_api_url
    if not api_url:
        raise ValueError("a worker needs a Prefect server: set PREFECT_API_URL (distributed mode)")
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    argv = [
        prefect,
        "worker",
        "start",
        "--pool",
        settings.prefect_work_pool,
        "--type",
        "process",
        "--limit",
        str(limit or settings.triage_concurrency),
    ]
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", WORKER_QUERY_SECONDS)
    return argv, env
