"""The Prefect flow ``run_cohort``: one saved research cohort in, every study analysed.

Accepts the name of a cohort saved by :mod:`archive.cohorts`; maps the
cohort's model over its pending studies with bounded concurrency, one task
run per chunk of up to ``CHUNK_SIZE`` studies (:func:`analyse_studies`: the
model looked up once, each study read once, in a thread, while the model
works on the study before, see :mod:`archive.cohort_analysis`), so that
Prefect's cost per task run is shared by many studies. The run is on the low
priority lane: before each study it waits while clinical triage jobs are
queued or running (checked in the transaction that claims the study,
:func:`archive.cohorts.claim_item`), and the process keeps torch to
``cohort_torch_threads`` threads, so a clinical study never waits behind
research work for more than the one study in flight. In
distributed mode the same flow is a deployment on the ``cohort`` work queue
(priority 10, after ``triage``; see :mod:`archive.cohort_runner`).

Idempotent and resumable: studies are claimed one at a time, when their
turn comes, and finished (outcome and new results in one transaction) before
the next is claimed; studies already done are not claimed again; a run
that was killed leaves its in-flight studies ``running``, and the next run
puts them back (:func:`archive.cohorts.begin_run`); results are cached per
(series content, model, version, weights) so a study interrupted after its
inference is not inferred twice. A study that fails is recorded as failed
with its reason while the others go on.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from archive.analysis import AnalysisError
from archive.cohort_analysis import PreparedStudy, complete_cohort_study, prepare_cohort_study
from archive.cohorts import (
    ClaimedItem,
    CohortError,
    CohortInfo,
    CohortItemStatusValues,
    ItemOutcome,
    begin_run,
    claim_item,
    clinical_work_waiting,
    end_run,
    fail_running_items,
    finish_item,
    get_cohort,
    heartbeat,
    pending_items,
    release_item,
)
from flows import runtime
from flows.triage import RETRY_DELAY_SECONDS, retry_transient

logger = logging.getLogger(__name__)

MAX_CONCURRENCY = 16
CHUNK_SIZE = 50
"""Studies per ``analyse-studies`` task run (fewer when the workers would go idle)."""
READ_AHEAD = 2
"""Studies read ahead of the model, in a thread (evens out studies slower to read)."""
HEARTBEAT_SECONDS = 10.0


def cohort_model(cohort: CohortInfo) -> Any:
    """The installed model of the cohort, refusing other weights than the cohort was made with.

    Raises
    ------
    CohortError
        The model version is not installed, or its weights changed since the
        cohort was created (a run must be reproducible).
    """
    registry = runtime.current().registry
    try:
        model = registry.get(cohort.model_name, cohort.model_version)  # type: ignore[attr-defined]
    except LookupError as exc:
        raise CohortError(f"cohort {cohort.name!r}: {exc}") from None
    if model.identity.weights_sha256 != cohort.weights_sha256:
        raise CohortError(
            f"cohort {cohort.name!r}: model {cohort.model_name} {cohort.model_version} has other "
            f"weights (sha256 {model.identity.weights_sha256[:12]}) than when the cohort was "
            f"created ({cohort.weights_sha256[:12]})"
        )
    return model


@dataclass(frozen=True)
class ChunkReport:
    """What one :func:`analyse_studies` task did."""

    claimed: int
    waited_seconds: float
    owner: bool = True


def _with_retries(step: Callable[[], Any]) -> Any:
    """`step`, tried again after transient errors (anything but an AnalysisError)."""
    for delay in (*RETRY_DELAY_SECONDS, None):
        try:
            return step()
        except AnalysisError:
            raise
        except Exception:
            if delay is None:
                raise
            logger.warning("cohort study: transient error, retrying in %s s", delay, exc_info=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


@task(
    name="analyse-studies",
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def analyse_studies(
    cohort: CohortInfo, items: list[tuple[int, int]], run_id: str, write_sr: bool
) -> ChunkReport:
    """Analyse a chunk of the cohort's studies, one at a time, clinical triage first.

    `items` are (cohort item id, study pk) pairs, in cohort order. Each study
    is claimed only when its turn comes, in one transaction that also checks
    that this run still owns the cohort and that no clinical triage job waits
    (:func:`archive.cohorts.claim_item`) and records the outcome of the study
    before: a killed run leaves at most one study running.
    While the model works on a study, a thread reads the next ``READ_AHEAD``
    (it only reads; a study is never analysed before it is claimed). A retry of the
    task skips the studies already finished.
    """
    rt = runtime.current()
    settings = rt.settings
    model = cohort_model(cohort)
    versions = runtime.software_versions()
    stale = settings.cohort_stale_triage_seconds if settings.cohort_yield_to_triage else None
    claimed = 0
    waited = 0.0

    def prepare(study_pk: int) -> PreparedStudy:
        return prepare_cohort_study(rt.db, rt.file_store, model, study_pk)

    reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cohort-read")
    ahead = collections.deque(reader.submit(prepare, pk) for _, pk in items[:READ_AHEAD])
    finished: tuple[int, ItemOutcome] | None = None  # recorded with the next claim
    try:
        for k, (item_id, _study_pk) in enumerate(items):
            current = ahead.popleft()
            while True:
                try:
                    claim = claim_item(
                        rt.db,
                        cohort.id,
                        item_id,
                        run_id,
                        stale_pending_seconds=stale,
                        finished=finished,
                    )
                except BaseException:
                    if finished is not None:
                        release_item(rt.db, finished[0])  # the task's retry analyses it again
                    raise
                finished = None
                if not claim.owner:
                    return ChunkReport(claimed, waited, owner=False)
                if not claim.clinical_waiting:
                    break
                step = time.monotonic()
                time.sleep(settings.cohort_yield_poll_seconds)
                waited += time.monotonic() - step
            if k + READ_AHEAD < len(items):
                ahead.append(reader.submit(prepare, items[k + READ_AHEAD][1]))
            item = claim.item
            if item is None:
                continue  # no longer pending: another run finished it
            claimed += 1
            try:
                outcome = _analyse(rt, model, cohort, item, current, write_sr, versions, prepare)
            except BaseException:
                release_item(rt.db, item.id)  # the task's retry claims it again
                raise
            finished = (item.id, outcome)
            if outcome.status is CohortItemStatusValues.FAILED:
                logger.warning(
                    "cohort %s: study %s failed: %s",
                    cohort.name,
                    item.study_instance_uid,
                    outcome.error,
                )
        if finished is not None:
            try:
                finish_item(rt.db, *finished)
            except BaseException:
                release_item(rt.db, finished[0])
                raise
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
    return ChunkReport(claimed, waited)


def _analyse(
    rt: runtime.TriageRuntime,
    model: Any,
    cohort: CohortInfo,
    item: ClaimedItem,
    ahead: concurrent.futures.Future[PreparedStudy] | None,
    write_sr: bool,
    versions: str,
    prepare: Callable[[int], PreparedStudy],
) -> ItemOutcome:
    """One claimed study's outcome; transient errors are retried, then recorded as failed."""
    state = {"first": ahead}

    def attempt() -> ItemOutcome:
        future, state["first"] = state["first"], None
        prepared = future.result() if future is not None else prepare(item.study_pk)
        return complete_cohort_study(
            rt.db,
            rt.ingest,
            model,
            item,
            prepared,
            cohort_name=cohort.name,
            write_sr=write_sr,
            software_versions=versions,
        )

    try:
        return _with_retries(attempt)
    except Exception as exc:
        reason = f"run error after retries: {type(exc).__name__}: {str(exc)[:300]}"
        return ItemOutcome(CohortItemStatusValues.FAILED, error=reason)


class _Lane:
    """Waits while clinical triage has work (clinical first); keeps the run's heartbeat.

    The heartbeat is a thread, so a long study does not make the run look dead
    to another run that would take the cohort over.
    """

    def __init__(self, cohort: CohortInfo, run_id: str) -> None:
        rt = runtime.current()
        self.db = rt.db
        self.settings = rt.settings
        self.cohort = cohort
        self.run_id = run_id
        self.waited_seconds = 0.0
        self.taken_over = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="cohort-heartbeat", daemon=True)

    def __enter__(self) -> _Lane:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if not heartbeat(self.db, self.cohort.id, self.run_id):
                    self.taken_over = True
                    return
            except Exception:
                logger.exception("cohort %s: heartbeat failed", self.cohort.name)

    def check(self) -> None:
        if self.taken_over:
            raise CohortError(f"cohort {self.cohort.name!r} was taken over by another run")

    def wait_for_clinical(self) -> None:
        if not self.settings.cohort_yield_to_triage:
            return
        started = time.monotonic()
        announced = False
        while True:
            waiting = clinical_work_waiting(
                self.db, stale_pending_seconds=self.settings.cohort_stale_triage_seconds
            )
            if not waiting:
                break
            if not announced:
                logger.info(
                    "cohort %s yields to %d clinical triage job(s)", self.cohort.name, waiting
                )
                announced = True
            self.check()
            time.sleep(self.settings.cohort_yield_poll_seconds)
        self.waited_seconds += time.monotonic() - started


def _limit_threads() -> None:
    threads = runtime.current().settings.cohort_torch_threads
    if threads > 0:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@flow(
    name="run_cohort",
    persist_result=False,
    log_prints=False,
    validate_parameters=False,
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_CONCURRENCY),
)
def run_cohort(
    cohort_name: str,
    concurrency: int | None = None,
    write_sr: bool | None = None,
    max_studies: int | None = None,
) -> dict[str, Any]:
    """Analyse the cohort's pending studies with its model, clinical triage first.

    Parameters
    ----------
    cohort_name : str
        A cohort saved with ``pacs-triage cohort create``.
    concurrency : int | None
        Studies analysed at once (default ``cohort_concurrency``, at most 16).
    write_sr : bool | None
        Store a research SR into each analysed study (default: the cohort's choice).
    max_studies : int | None
        Stop after claiming this many studies (the rest stay pending for the next run).

    Returns
    -------
    dict
        ``status`` of the cohort, ``processed`` (studies claimed by this run),
        ``counts`` per study status, ``seconds`` and ``yield_seconds`` (time spent
        waiting for clinical triage).
    """
    rt = runtime.current()
    cohort = get_cohort(rt.db, cohort_name)
    cohort_model(cohort)  # refuse to start with the wrong model
    workers = max(1, min(concurrency or rt.settings.cohort_concurrency, MAX_CONCURRENCY))
    write = cohort.write_sr if write_sr is None else write_sr
    _limit_threads()
    from prefect.runtime import flow_run

    run_id = str(flow_run.get_id() or uuid.uuid4())
    resumed = begin_run(
        rt.db, cohort.id, run_id, stale_after_seconds=rt.settings.cohort_stale_run_seconds
    )
    logger.info(
        "cohort %s: run %s started (%d of %d studies open, %d put back from an interrupted run)",
        cohort.name,
        run_id,
        cohort.total - cohort.finished,
        cohort.total,
        resumed,
    )
    lane = _Lane(cohort, run_id)
    started = time.perf_counter()
    pending = pending_items(rt.db, cohort.id, limit=max_studies)
    # Chunks keep Prefect's cost per study small and still give every worker work.
    size = max(1, min(CHUNK_SIZE, math.ceil(len(pending) / workers)))
    chunks = [pending[k : k + size] for k in range(0, len(pending), size)]
    in_flight: dict[concurrent.futures.Future[Any], tuple[Any, list[tuple[int, int]]]] = {}
    processed = 0

    def reap(block: bool) -> None:
        nonlocal processed
        if not in_flight:
            return
        done, _ = concurrent.futures.wait(
            list(in_flight),
            timeout=None if block else 0,
            return_when=concurrent.futures.FIRST_COMPLETED,
        )
        for wrapped in done:
            future, chunk = in_flight.pop(wrapped)
            try:
                report = future.result(raise_on_failure=True)
            except Exception as exc:
                # The task failed after its retries (index trouble, not a study's analysis,
                # which records its own failure): no study of it may stay running; its
                # unclaimed studies stay pending for the next run.
                reason = f"run error after retries: {type(exc).__name__}: {str(exc)[:300]}"
                logger.error("cohort %s: %s", cohort.name, reason)
                processed += fail_running_items(rt.db, [item_id for item_id, _ in chunk], reason)
                continue
            processed += report.claimed
            lane.waited_seconds += report.waited_seconds
            if not report.owner:
                lane.taken_over = True

    with lane:
        for chunk in chunks:
            while len(in_flight) >= workers:
                reap(block=True)
            reap(block=False)
            lane.wait_for_clinical()
            lane.check()
            future = analyse_studies.submit(cohort, chunk, run_id, write)
            in_flight[future.wrapped_future] = (future, chunk)
        while in_flight:
            reap(block=True)
        lane.check()

    status = end_run(rt.db, cohort.id, run_id)
    final = get_cohort(rt.db, cohort.name)
    seconds = time.perf_counter() - started
    logger.info(
        "cohort %s: run %s ended %s after %.1f s: %s (%.1f s yielded to triage)",
        cohort.name,
        run_id,
        status.value,
        seconds,
        final.counts,
        lane.waited_seconds,
    )
    return {
        "status": status.value,
        "processed": processed,
        "counts": final.counts,
        "seconds": seconds,
        "yield_seconds": lane.waited_seconds,
    }
