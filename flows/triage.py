"""The Prefect flow ``triage_study``: one ready study in, one final triage state out.

Accepts the id of a triage job (a row of the outbox that
:mod:`archive.triage` writes when a study becomes ready); produces a TID 1500
report stored in the study, ``model_result`` rows, and exactly one final
state for the study: ``triaged``, ``no_applicable_model`` or ``failed`` with
the reason. Tasks are coarse (Prefect costs ~50 ms of server CPU per task
run): one per series load, one per (series, model) inference, one for the
report, two for bookkeeping. Each task body is one call into
:mod:`archive.analysis`, :mod:`archive.triage` or pipeline/; tasks pass
identifiers and small descriptions, never volumes (those stay in the
process's :class:`~archive.analysis.VolumeCache`). Transient errors
(``OSError``, database errors) are retried; an
:class:`~archive.analysis.AnalysisError` (corrupt pixel data, inconsistent
geometry, a model that raises) is not, and fails the study with its reason
while other studies go on. Every task is safe to re-run: model results are
cached per (series content, model name, version, weights hash) and the report
has deterministic UIDs, so a re-run after a crash stores nothing twice.

The flow is ``async`` only because Prefect runs an async flow ~0.2 s faster
than a sync one (no heartbeat thread); its tasks are synchronous.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from archive import followup
from archive.analysis import (
    AnalysisError,
    SeriesPlan,
    StudyPlan,
    TriageModel,
    load_job,
    load_volume,
    needs_loading,
    plan_study,
    run_model,
    store_report,
)
from archive.results import RecordedResult
from archive.triage import (
    ClaimedJob,
    TriageOutcome,
    TriageStateValues,
    close_superseded_job,
    finish_job,
    start_analysis,
)
from flows import runtime
from pipeline.findings import ModelResult
from pipeline.priority import assess_priority
from pipeline.report import AnalysisOutcomeValues

# A fixed name: a Prefect worker loads this file from its entrypoint under another module name.
logger = logging.getLogger("flows.triage")

RETRIES = 2
RETRY_DELAY_SECONDS = [1, 5]
SHADOW = "shadow"


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry anything except an :class:`AnalysisError`."""
    try:
        state.result(raise_on_failure=True)
    except AnalysisError:
        return False
    except Exception:
        return True
    return True


_task_options: dict[str, Any] = {
    "retries": RETRIES,
    "retry_delay_seconds": RETRY_DELAY_SECONDS,
    "retry_condition_fn": retry_transient,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}


@task(name="begin-analysis", **_task_options)
def begin_analysis(job_id: int) -> ClaimedJob | None:
    """Mark the study analysing; None (job closed) if a newer generation superseded it."""
    rt = runtime.current()
    job = load_job(rt.db, job_id)
    if start_analysis(rt.db, job):
        return job
    close_superseded_job(rt.db, job)
    return None


@task(name="plan-study", **_task_options)
def plan(study_pk: int) -> StudyPlan:
    """The study's image series and the models (active and shadow) that apply to each."""
    rt = runtime.current()
    return plan_study(rt.db, rt.file_store, rt.registry, study_pk)


@task(name="load-series", **_task_options)
def load_series(series: SeriesPlan) -> tuple[int, int, int] | None:
    """Load a series as a volume into this process's cache; returns its shape.

    Nothing is loaded (None) when every model's result on these images is recorded.
    """
    rt = runtime.current()
    if not needs_loading(rt.db, series):
        return None
    volume = rt.volumes.get(series.fingerprint)
    if volume is None:
        volume = load_volume(series)
        rt.volumes.put(series.fingerprint, volume)
    return volume.shape


@task(name="infer", **_task_options)
def infer(study_pk: int, series: SeriesPlan, model: TriageModel) -> RecordedResult:
    """One model on one series (a recorded result of the same images and model is reused)."""
    rt = runtime.current()

    def load() -> Any:
        volume = load_volume(series)
        rt.volumes.put(series.fingerprint, volume)
        return volume

    return run_model(rt.db, study_pk, series, model, rt.volumes.get(series.fingerprint), load=load)


@task(name="store-report", **_task_options)
def report(
    study_plan: StudyPlan,
    active_results: list[ModelResult],
    outcome: AnalysisOutcomeValues,
    failure_reason: str | None,
    generation: int,
) -> tuple[str | None, Any]:
    """Score the priority, build the TID 1500 report and store it in the study."""
    rt = runtime.current()
    priority = (
        assess_priority(active_results, study_plan.order)
        if outcome is not AnalysisOutcomeValues.NO_APPLICABLE_MODEL
        else None
    )
    sr_uid = store_report(
        rt.db,
        rt.ingest,
        study_plan,
        active_results,
        priority=priority,
        outcome=outcome,
        failure_reason=failure_reason,
        generation=generation,
        software_versions=runtime.software_versions(),
    )
    return sr_uid, priority


@task(name="finish", **_task_options)
def finish(job: ClaimedJob, outcome: TriageOutcome) -> bool:
    """Record the outcome (only the current generation sets the study's state); follow up."""
    rt = runtime.current()
    updated = finish_job(rt.db, job, outcome)
    try:
        followup.after_triage(
            rt.db, job.study_pk, job.generation, settings=rt.settings, ingest=rt.ingest
        )
    except Exception:
        logger.exception("follow-up of study %s failed; triage state kept", job.study_instance_uid)
    return updated


def _reason(failures: list[str]) -> str:
    text = "; ".join(failures)
    return text if len(text) <= 1024 else text[:1021] + "..."


@flow(name="triage_study", persist_result=False, log_prints=False, validate_parameters=False)
async def triage_study(job_id: int) -> dict[str, Any]:
    """Analyse one ready study: load series, infer, score priority, store the SR, record the state.

    Parameters
    ----------
    job_id : int
        The outbox job (``triage_job.id``) the dispatcher claimed.

    Returns
    -------
    dict
        ``state``, ``sr_sop_instance_uid``, ``priority_class`` and the time
        spent per step in seconds (``plan``, ``load``, ``inference``,
        ``report``, ``bookkeeping``).
    """
    timings = {"plan": 0.0, "load": 0.0, "inference": 0.0, "report": 0.0, "bookkeeping": 0.0}
    started = time.perf_counter()
    job = begin_analysis(job_id)
    timings["bookkeeping"] += time.perf_counter() - started
    if job is None:
        logger.info("triage job %d superseded by a newer generation; not analysed", job_id)
        return {"state": "superseded", "timings": timings}

    try:
        outcome, summary = _analyse(job, timings)
    except Exception as exc:  # after retries: still a visible state, never a silent drop
        logger.exception("triage of study %s failed", job.study_instance_uid)
        outcome = TriageOutcome(
            TriageStateValues.FAILED,
            failure_reason=f"analysis error: {type(exc).__name__}: {str(exc)[:300]}",
        )
        summary = {}
    step = time.perf_counter()
    finish(job, outcome)
    timings["bookkeeping"] += time.perf_counter() - step
    logger.info(
        "study %s generation %d %s in %.2f s (plan %.2f, load %.2f, inference %.2f, "
        "report %.2f, bookkeeping %.2f)",
        job.study_instance_uid,
        job.generation,
        outcome.state.value,
        time.perf_counter() - started,
        timings["plan"],
        timings["load"],
        timings["inference"],
        timings["report"],
        timings["bookkeeping"],
    )
    return {
        "state": outcome.state.value,
        "failure_reason": outcome.failure_reason,
        "sr_sop_instance_uid": outcome.sr_sop_instance_uid,
        "priority_class": outcome.priority_class,
        "timings": timings,
        **summary,
    }


def _analyse(job: ClaimedJob, timings: dict[str, float]) -> tuple[TriageOutcome, dict[str, Any]]:
    step = time.perf_counter()
    try:
        study_plan = plan(job.study_pk)
    except AnalysisError as exc:
        return TriageOutcome(TriageStateValues.FAILED, failure_reason=str(exc)), {}
    timings["plan"] += time.perf_counter() - step

    failures: list[str] = []
    cached = 0
    active: list[ModelResult] = []
    shadow: list[ModelResult] = []
    for series in study_plan.analysed:
        step = time.perf_counter()
        try:
            load_series(series)
        except AnalysisError as exc:
            failures.append(str(exc))
            continue
        finally:
            timings["load"] += time.perf_counter() - step
        for model in series.models:
            step = time.perf_counter()
            try:
                recorded = infer(job.study_pk, series, model)
            except AnalysisError as exc:
                failures.append(str(exc))
                continue
            finally:
                timings["inference"] += time.perf_counter() - step
            cached += int(recorded.cached)
            (shadow if str(recorded.mode) == SHADOW else active).append(recorded.result)
        runtime.current().volumes.discard(series.fingerprint)

    if failures:
        outcome_value = AnalysisOutcomeValues.FAILED
    elif not study_plan.analysed:
        outcome_value = AnalysisOutcomeValues.NO_APPLICABLE_MODEL
    elif not active:
        # Only shadow models apply: they ran, but a study is not triaged by them.
        outcome_value = AnalysisOutcomeValues.NO_APPLICABLE_MODEL
    else:
        outcome_value = AnalysisOutcomeValues.COMPLETED
    failure_reason = _reason(failures) if failures else None

    step = time.perf_counter()
    if (
        outcome_value is AnalysisOutcomeValues.NO_APPLICABLE_MODEL
        and not runtime.current().settings.triage_report_no_applicable_model
    ):
        sr_uid, priority = None, None
    else:
        sr_uid, priority = report(
            study_plan,
            active if outcome_value is not AnalysisOutcomeValues.NO_APPLICABLE_MODEL else [],
            outcome_value,
            failure_reason,
            job.generation,
        )
    timings["report"] += time.perf_counter() - step

    state = {
        AnalysisOutcomeValues.COMPLETED: TriageStateValues.TRIAGED,
        AnalysisOutcomeValues.NO_APPLICABLE_MODEL: TriageStateValues.NO_APPLICABLE_MODEL,
        AnalysisOutcomeValues.FAILED: TriageStateValues.FAILED,
    }[outcome_value]
    outcome = TriageOutcome(
        state,
        failure_reason=failure_reason,
        priority_class=str(priority.priority_class) if priority is not None else None,
        priority_score=priority.score if priority is not None else None,
        priority_reason=priority.reason if priority is not None else None,
        sr_sop_instance_uid=sr_uid,
    )
    summary = {
        "models": [f"{r.model.name} {r.model.version}" for r in active],
        "shadow_models": [f"{r.model.name} {r.model.version}" for r in shadow],
        "series_analysed": len(study_plan.analysed),
        "cached_results": cached,
    }
    return outcome, summary
