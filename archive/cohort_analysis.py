"""The analysis of one study of a research cohort, as a plain function over the archive.

Accepts a claimed cohort study, the cohort's model and the archive (index,
file store, ingest path) and produces an :class:`~archive.cohorts.ItemOutcome`:
``done`` with the model's results recorded in ``model_result`` (computed now,
or reused when the same model version already ran on exactly these images),
``skipped`` when the model applies to no series of the study, or ``failed``
with the reason. It reuses the triage steps of :mod:`archive.analysis`
(plan, load, run-and-record), so a cohort and triage share one result cache.
Optionally stores a research SR (:mod:`pipeline.research`) into the study.
The analysis is split in two so a run can overlap them across studies:
:func:`prepare_cohort_study` only reads (index and files, each file once) and
may run ahead, in a thread; :func:`complete_cohort_study` runs the model on a
claimed study and returns the new results with the outcome, for
:func:`archive.cohorts.finish_item` to record in one transaction.
Transient errors (``OSError``, database errors) propagate so the caller can
retry; never talks to Prefect.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pydicom

from archive.analysis import (
    AnalysisError,
    SeriesPlan,
    StudyPlan,
    TriageModel,
    load_volume,
    plan_study,
    report_exists,
    run_model,
)
from archive.cohorts import ClaimedItem, CohortItemStatusValues, ItemOutcome
from archive.db import Database
from archive.ingest import Ingest
from archive.results import NewResult, RecordedResult, cached_result
from archive.store import FileStore
from pipeline.findings import ModelResult
from pipeline.research import build_research_report, research_report_uids
from pipeline.selection import SeriesDescriptor
from pipeline.volume import Volume

logger = logging.getLogger(__name__)

RESEARCH_CALLING_AE_TITLE = "PACS_TRIAGE_RSCH"


@dataclass(frozen=True)
class SingleModelCatalogue:
    """A model catalogue that offers only the cohort's model (where its rule matches)."""

    model: TriageModel

    def applicable(self, series: SeriesDescriptor) -> Sequence[TriageModel]:
        return [self.model] if self.model.rule.matches(series) else []


def _store_research_report(
    db: Database,
    ingest: Ingest,
    headers: Sequence,
    results: Sequence[ModelResult],
    *,
    study_instance_uid: str,
    cohort_name: str,
    software_versions: str | None,
) -> str:
    _, sop_instance_uid = research_report_uids(study_instance_uid, results, cohort_name)
    if report_exists(db, sop_instance_uid):
        return sop_instance_uid
    sr = build_research_report(
        headers, results, cohort_name=cohort_name, software_versions=software_versions
    )
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    stored = ingest.store(
        buffer.getvalue(), calling_ae_title=RESEARCH_CALLING_AE_TITLE, internal=True
    )
    if not stored.ok:
        raise OSError(
            f"research report {sop_instance_uid} not stored: status 0x{stored.status:04X} "
            f"{stored.error_comment}"
        )
    return sop_instance_uid


@dataclass
class PreparedSeries:
    """One series of a prepared study: its recorded result, or its volume, or why not."""

    series: SeriesPlan
    recorded: RecordedResult | None = None
    volume: Volume | None = None
    error: str | None = None


@dataclass
class PreparedStudy:
    """A study read from the archive, ready for the model (:func:`prepare_cohort_study`)."""

    study_pk: int
    plan: StudyPlan | None
    series: list[PreparedSeries]
    outcome: ItemOutcome | None = None
    """Decided without the model: ``failed`` (unreadable) or ``skipped`` (no series matches)."""
    load_seconds: float = 0.0
    seconds: float = 0.0


def prepare_cohort_study(
    db: Database, file_store: FileStore, model: TriageModel, study_pk: int
) -> PreparedStudy:
    """Read one study for the model: plan, recorded results, volumes; each file read once.

    Reads only (the index and the files), so it may run ahead of the claim of
    the study, in another thread, while the model works on the previous one.

    Raises
    ------
    OSError, sqlalchemy.exc.SQLAlchemyError
        Transient trouble with the file store or the index (retry).
    """
    started = time.perf_counter()
    try:
        plan = plan_study(
            db, file_store, SingleModelCatalogue(model), study_pk, read=pydicom.dcmread
        )
    except AnalysisError as exc:
        outcome = ItemOutcome(CohortItemStatusValues.FAILED, error=str(exc))
        return PreparedStudy(study_pk, None, [], outcome, seconds=time.perf_counter() - started)
    if not plan.analysed:
        outcome = ItemOutcome(
            CohortItemStatusValues.SKIPPED,
            error=(
                f"no series matches the selection rule of model "
                f"{model.identity.name} {model.identity.version}"
            ),
        )
        return PreparedStudy(study_pk, plan, [], outcome, seconds=time.perf_counter() - started)
    prepared: list[PreparedSeries] = []
    # The files were read with the plan: that is loading too, unless every result is reused.
    plan_seconds = time.perf_counter() - started
    load_seconds = 0.0
    offset = 0
    for series in plan.series:
        datasets = plan.headers[offset : offset + len(series.instances)]
        offset += len(series.instances)
        if not series.models:
            continue
        recorded = cached_result(
            db,
            series_instance_uid=series.series_instance_uid,
            fingerprint=series.fingerprint,
            model=model.identity,
            definitions=model.findings,
        )
        if recorded is not None:
            prepared.append(PreparedSeries(series, recorded=recorded))
            continue
        step = time.perf_counter()
        try:
            prepared.append(PreparedSeries(series, volume=load_volume(series, datasets)))
        except AnalysisError as exc:
            prepared.append(PreparedSeries(series, error=str(exc)))
        load_seconds += time.perf_counter() - step
    if any(entry.recorded is None for entry in prepared):
        load_seconds += plan_seconds
    return PreparedStudy(
        study_pk, plan, prepared, load_seconds=load_seconds, seconds=time.perf_counter() - started
    )


def complete_cohort_study(
    db: Database,
    ingest: Ingest,
    model: TriageModel,
    item: ClaimedItem,
    prepared: PreparedStudy,
    *,
    cohort_name: str,
    write_sr: bool,
    software_versions: str | None = None,
) -> ItemOutcome:
    """Run the model on a prepared study, record its results and optionally the research SR.

    Returns
    -------
    ItemOutcome
        ``done`` (with timings; ``cached`` when every result was reused),
        ``skipped`` (no series matches the model's rule) or ``failed`` (the
        reason names the series and the cause, never patient data).

    Raises
    ------
    OSError, sqlalchemy.exc.SQLAlchemyError
        Transient trouble with the file store or the index (retry).
    """
    started = time.perf_counter()
    if prepared.outcome is not None:
        return replace(prepared.outcome, total_seconds=prepared.seconds)
    assert prepared.plan is not None
    inference_seconds = 0.0
    results: list[ModelResult] = []
    all_cached = True
    failures: list[str] = []
    new_results: list[NewResult] = []
    for entry in prepared.series:
        if entry.error is not None:
            failures.append(entry.error)
            continue
        recorded = entry.recorded
        if recorded is None:
            try:
                recorded = run_model(
                    db,
                    item.study_pk,
                    entry.series,
                    model,
                    entry.volume,
                    look_up=False,
                    record=False,
                )
            except AnalysisError as exc:
                failures.append(str(exc))
                continue
            inference_seconds += recorded.result.inference_seconds
            new_results.append(
                NewResult(item.study_pk, entry.series.fingerprint, recorded.result, recorded.mode)
            )
        all_cached = all_cached and recorded.cached
        results.append(recorded.result)
    sr_uid = None
    if write_sr and results and not failures:
        sr_uid = _store_research_report(
            db,
            ingest,
            prepared.plan.headers,
            results,
            study_instance_uid=item.study_instance_uid,
            cohort_name=cohort_name,
            software_versions=software_versions,
        )
    total = prepared.seconds + time.perf_counter() - started
    if failures:
        text = "; ".join(failures)
        return ItemOutcome(
            CohortItemStatusValues.FAILED,
            error=text if len(text) <= 1024 else text[:1021] + "...",
            series_analysed=len(results),
            load_seconds=prepared.load_seconds,
            inference_seconds=inference_seconds,
            total_seconds=total,
            new_results=tuple(new_results),
        )
    return ItemOutcome(
        CohortItemStatusValues.DONE,
        cached=all_cached,
        series_analysed=len(results),
        load_seconds=prepared.load_seconds,
        inference_seconds=inference_seconds,
        total_seconds=total,
        sr_sop_instance_uid=sr_uid,
        new_results=tuple(new_results),
    )


def analyse_cohort_study(
    db: Database,
    file_store: FileStore,
    ingest: Ingest,
    model: TriageModel,
    item: ClaimedItem,
    *,
    cohort_name: str,
    write_sr: bool,
    software_versions: str | None = None,
) -> ItemOutcome:
    """Run the cohort's model on every matching series of one study and record the results.

    :func:`prepare_cohort_study` then :func:`complete_cohort_study`, one after
    the other (a run overlaps them across studies). The results computed now
    are in the outcome's ``new_results``: :func:`archive.cohorts.finish_item`
    records them with the outcome.
    """
    prepared = prepare_cohort_study(db, file_store, model, item.study_pk)
    return complete_cohort_study(
        db,
        ingest,
        model,
        item,
        prepared,
        cohort_name=cohort_name,
        write_sr=write_sr,
        software_versions=software_versions,
    )
