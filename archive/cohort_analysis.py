"""The analysis of one study of a research cohort, as a plain function over the archive.

Accepts a claimed cohort study, the cohort's model and the archive (index,
file store, ingest path) and produces an :class:`~archive.cohorts.ItemOutcome`:
``done`` with the model's results recorded in ``model_result`` (computed now,
or reused when the same model version already ran on exactly these images),
``skipped`` when the model applies to no series of the study, or ``failed``
with the reason. It reuses the triage steps of :mod:`archive.analysis`
(plan, load, run-and-record), so a cohort and triage share one result cache.
Optionally stores a research SR (:mod:`pipeline.research`) into the study.
Transient errors (``OSError``, database errors) propagate so the caller can
retry; never talks to Prefect.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from archive.analysis import (
    AnalysisError,
    SeriesPlan,
    TriageModel,
    load_volume,
    plan_study,
    report_exists,
    run_model,
)
from archive.cohorts import ClaimedItem, CohortItemStatusValues, ItemOutcome
from archive.db import Database
from archive.ingest import Ingest
from archive.results import cached_result
from archive.store import FileStore
from pipeline.findings import ModelResult
from pipeline.research import build_research_report, research_report_uids
from pipeline.selection import SeriesDescriptor

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
    try:
        plan = plan_study(db, file_store, SingleModelCatalogue(model), item.study_pk)
    except AnalysisError as exc:
        return ItemOutcome(
            CohortItemStatusValues.FAILED,
            error=str(exc),
            total_seconds=time.perf_counter() - started,
        )
    if not plan.analysed:
        return ItemOutcome(
            CohortItemStatusValues.SKIPPED,
            error=(
                f"no series matches the selection rule of model "
                f"{model.identity.name} {model.identity.version}"
            ),
            total_seconds=time.perf_counter() - started,
        )
    load_seconds = 0.0
    inference_seconds = 0.0
    results: list[ModelResult] = []
    all_cached = True
    failures: list[str] = []
    for series in plan.analysed:
        try:
            result, cached, loading = _series_result(db, item.study_pk, series, model)
        except AnalysisError as exc:
            failures.append(str(exc))
            continue
        load_seconds += loading
        if not cached:
            inference_seconds += result.inference_seconds
        all_cached = all_cached and cached
        results.append(result)
    sr_uid = None
    if write_sr and results and not failures:
        sr_uid = _store_research_report(
            db,
            ingest,
            plan.headers,
            results,
            study_instance_uid=item.study_instance_uid,
            cohort_name=cohort_name,
            software_versions=software_versions,
        )
    total = time.perf_counter() - started
    if failures:
        text = "; ".join(failures)
        return ItemOutcome(
            CohortItemStatusValues.FAILED,
            error=text if len(text) <= 1024 else text[:1021] + "...",
            series_analysed=len(results),
            load_seconds=load_seconds,
            inference_seconds=inference_seconds,
            total_seconds=total,
        )
    return ItemOutcome(
        CohortItemStatusValues.DONE,
        cached=all_cached,
        series_analysed=len(results),
        load_seconds=load_seconds,
        inference_seconds=inference_seconds,
        total_seconds=total,
        sr_sop_instance_uid=sr_uid,
    )


def _series_result(
    db: Database, study_pk: int, series: SeriesPlan, model: TriageModel
) -> tuple[ModelResult, bool, float]:
    """(result, reused?, seconds spent loading) of the model on one series."""
    recorded = cached_result(
        db,
        series_instance_uid=series.series_instance_uid,
        fingerprint=series.fingerprint,
        model=model.identity,
        definitions=model.findings,
    )
    if recorded is not None:
        return recorded.result, True, 0.0
    step = time.perf_counter()
    volume = load_volume(series)
    loading = time.perf_counter() - step
    recorded = run_model(db, study_pk, series, model, volume)
    return recorded.result, recorded.cached, loading
