"""The steps of a study's AI analysis, as plain functions over the archive.

Accepts a triage job (from the outbox of :mod:`archive.triage`), the index,
the file store and a model registry; produces the pieces the Prefect flow
``flows.triage.triage_study`` strings together: the study's series with the
models that apply to each (:func:`plan_study`), a series' volume
(:func:`load_volume`), a model's result, cached in the ``model_result`` table
(:func:`run_model`), and the TID 1500 report stored into the study through
:meth:`archive.ingest.Ingest.store` (:func:`store_report`). Domain decisions
(volume geometry, priority, SR content) stay in pipeline/; nothing here talks
to Prefect, and nothing here logs patient data.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select

from archive.db import Database
from archive.index import Instance, Series, Study, TriageJob, utcnow
from archive.ingest import Ingest, StoreOutcomeValues
from archive.results import RecordedResult, cached_result, record_result, series_fingerprint
from archive.store import FileStore
from archive.triage import ClaimedJob
from pipeline.findings import FindingDefinition, ModelIdentity, ModelResult
from pipeline.priority import OrderContext, PriorityAssessment
from pipeline.report import AnalysisOutcomeValues, build_measurement_report, measurement_report_uids
from pipeline.selection import SeriesDescriptor, SeriesRule
from pipeline.volume import PixelDataError, Volume, VolumeError, volume_from_datasets

logger = logging.getLogger(__name__)

# highdicom warns about a one-component Patient Name and quotes the name: patient
# data must not reach the logs (the name is copied into the SR as received).
warnings.filterwarnings(
    "ignore", message=r"The string .* is unlikely to represent the intended person name"
)

NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "SEG", "RWV", "REG", "DOC", "OT_SR"})
"""Series of these modalities hold no images to analyse (PS3.3 C.7.3.1.1.1 Modality)."""


class TriageModel(Protocol):
    """What the flow needs of an installed model (``models.registry.InstalledModel``)."""

    @property
    def identity(self) -> ModelIdentity: ...
    @property
    def findings(self) -> tuple[FindingDefinition, ...]: ...
    @property
    def rule(self) -> SeriesRule: ...
    @property
    def mode(self) -> str: ...
    def predict(self, volume: Volume) -> ModelResult: ...


class ModelCatalogue(Protocol):
    """What the flow needs of the model registry (``models.registry.ModelRegistry``)."""

    def applicable(self, series: SeriesDescriptor) -> Sequence[TriageModel]: ...


class AnalysisError(Exception):
    """A step of the analysis failed for a reason that retrying cannot change.

    The message is the study's visible failure reason: it names the series
    and the broken rule, never patient data.
    """


@dataclass(frozen=True)
class InstanceFile:
    """One stored instance of a series: its UID, file and checksum."""

    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    sha256: str


@dataclass(frozen=True)
class SeriesPlan:
    """One series of the study and the models that will analyse it."""

    descriptor: SeriesDescriptor
    instances: tuple[InstanceFile, ...]
    fingerprint: str
    models: tuple[TriageModel, ...] = ()

    @property
    def series_instance_uid(self) -> str:
        return self.descriptor.series_instance_uid


@dataclass(frozen=True)
class StudyPlan:
    """What the analysis of one study will do."""

    study_pk: int
    study_instance_uid: str
    series: tuple[SeriesPlan, ...]
    headers: tuple[Dataset, ...] = field(repr=False)
    """The SR's evidence: each series' first header (no pixel data), then the
    identifying UIDs of its other instances."""
    order: OrderContext = field(default_factory=OrderContext)

    @property
    def analysed(self) -> tuple[SeriesPlan, ...]:
        """The series that at least one model applies to."""
        return tuple(s for s in self.series if s.models)


def load_job(db: Database, job_id: int) -> ClaimedJob:
    """The outbox job `job_id` as a :class:`ClaimedJob` (for a flow run that got only its id).

    Raises
    ------
    LookupError
        If there is no such job.
    """
    with db.reader() as session:
        row = session.execute(
            select(TriageJob, Study.study_instance_uid)
            .join(Study, Study.id == TriageJob.study_pk)
            .where(TriageJob.id == job_id)
        ).one_or_none()
    if row is None:
        raise LookupError(f"triage job {job_id} does not exist")
    job, study_instance_uid = row
    return ClaimedJob(
        job.id,
        job.study_pk,
        study_instance_uid,
        job.generation,
        job.attempts,
        job.lease_expires_at,
    )


def read_header(path: Path) -> Dataset:
    """The data set of a stored file without its pixel data."""
    return pydicom.dcmread(path, stop_before_pixels=True)


def plan_study(
    db: Database,
    file_store: FileStore,
    registry: ModelCatalogue,
    study_pk: int,
    *,
    read: Callable[[Path], Dataset] | None = None,
) -> StudyPlan:
    """List the study's image series, read their headers and pick the models for each.

    The report series of pacs-triage itself and other non-image series are
    left out. A series whose headers cannot be read is an :class:`AnalysisError`.
    By default only each series' first header is read and the other
    instances are represented by their four identifying UIDs from the index
    (all the report needs). `read`, when given, reads every file instead: a
    caller that will load the volume anyway passes ``pydicom.dcmread`` to read
    each file once and gives the plan's headers to :func:`load_volume`.
    """
    with db.reader() as session:
        study = session.get(Study, study_pk)
        if study is None:
            raise AnalysisError(f"study {study_pk} is not in the index")
        rows = session.execute(
            select(
                Series.series_instance_uid,
                Series.modality,
                Series.body_part_examined,
                Series.series_description,
                Instance.sop_instance_uid,
                Instance.sop_class_uid,
                Instance.path,
                Instance.sha256,
            )
            .join(Instance, Instance.series_pk == Series.id)
            .where(Series.study_pk == study_pk)
            .order_by(Series.id, Instance.instance_number, Instance.id)
        ).all()
        study_instance_uid = study.study_instance_uid
        study_description = study.study_description
    report_series, _ = measurement_report_uids(study_instance_uid, [])
    grouped: OrderedDict[str, list] = OrderedDict()
    for row in rows:
        if row.modality.upper() in NON_IMAGE_MODALITIES or row.series_instance_uid == report_series:
            continue
        grouped.setdefault(row.series_instance_uid, []).append(row)

    series_plans: list[SeriesPlan] = []
    headers: list[Dataset] = []
    order = OrderContext()
    for series_instance_uid, series_rows in grouped.items():
        instances = tuple(
            InstanceFile(r.sop_instance_uid, r.sop_class_uid, file_store.absolute(r.path), r.sha256)
            for r in series_rows
        )
        try:
            if read is None:
                first = read_header(instances[0].path)
                # The report needs one whole header per series (patient, study,
                # Frame of Reference) and only the four UIDs of the other
                # instances, which the index holds: no need to read them all.
                series_headers = [
                    first,
                    *(
                        _reference(study_instance_uid, series_instance_uid, i)
                        for i in instances[1:]
                    ),
                ]
            else:
                series_headers = [read(i.path) for i in instances]
                first = series_headers[0]
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise AnalysisError(
                f"series {series_instance_uid}: stored file unreadable ({type(exc).__name__})"
            ) from exc
        headers.extend(series_headers)
        if order == OrderContext():
            order = OrderContext.from_dataset(first)
        descriptor = SeriesDescriptor(
            series_instance_uid=series_instance_uid,
            modality=series_rows[0].modality,
            body_part_examined=series_rows[0].body_part_examined,
            series_description=series_rows[0].series_description,
            image_type=tuple(str(v) for v in (first.get("ImageType") or ())),
            number_of_instances=len(instances),
            study_description=study_description,
        )
        models = tuple(registry.applicable(descriptor))
        series_plans.append(
            SeriesPlan(
                descriptor,
                instances,
                series_fingerprint((i.sop_instance_uid, i.sha256) for i in instances),
                models,
            )
        )
    return StudyPlan(study_pk, study_instance_uid, tuple(series_plans), tuple(headers), order)


def _reference(
    study_instance_uid: str, series_instance_uid: str, instance: InstanceFile
) -> Dataset:
    """An instance as the SR's evidence sees it: its four identifying UIDs, from the index."""
    ds = Dataset()
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.SOPClassUID = instance.sop_class_uid
    ds.SOPInstanceUID = instance.sop_instance_uid
    return ds


class VolumeCache:
    """The last few loaded volumes of this process, by series fingerprint.

    The flow's load task fills it and the inference tasks read it, so tasks
    pass identifiers, not arrays; a task that finds nothing (a retry in a new
    process) loads the series again.
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._volumes: OrderedDict[str, Volume] = OrderedDict()
        self._lock = threading.Lock()  # flow runs of one node share it

    def get(self, fingerprint: str) -> Volume | None:
        with self._lock:
            volume = self._volumes.get(fingerprint)
            if volume is not None:
                self._volumes.move_to_end(fingerprint)
            return volume

    def put(self, fingerprint: str, volume: Volume) -> None:
        with self._lock:
            self._volumes[fingerprint] = volume
            self._volumes.move_to_end(fingerprint)
            while len(self._volumes) > self.capacity:
                self._volumes.popitem(last=False)

    def discard(self, fingerprint: str) -> None:
        with self._lock:
            self._volumes.pop(fingerprint, None)


def needs_loading(db: Database, series: SeriesPlan) -> bool:
    """False when every model of the series has a recorded result on exactly these images."""
    return any(
        cached_result(
            db,
            series_instance_uid=series.series_instance_uid,
            fingerprint=series.fingerprint,
            model=model.identity,
            definitions=model.findings,
        )
        is None
        for model in series.models
    )


def load_volume(series: SeriesPlan, datasets: Sequence[Dataset] | None = None) -> Volume:
    """Read a series' files and build its :class:`~pipeline.volume.Volume`.

    `datasets` are the series' data sets with their pixel data when the
    caller read them already (the files are then not read again).

    Raises
    ------
    AnalysisError
        Corrupt or undecodable pixel data, or geometry that is not one regular
        volume, with pipeline/'s precise reason.
    OSError
        A file could not be read (transient: the flow retries).
    """
    if datasets is None:
        datasets = [pydicom.dcmread(i.path) for i in series.instances]
    try:
        return volume_from_datasets(datasets)
    except PixelDataError as exc:
        raise AnalysisError(
            f"series {series.series_instance_uid}: corrupt pixel data: {exc}"
        ) from exc
    except VolumeError as exc:
        raise AnalysisError(
            f"series {series.series_instance_uid}: inconsistent geometry: {exc}"
        ) from exc
    except Exception as exc:  # a decoder's own error type: still the data's fault
        raise AnalysisError(
            f"series {series.series_instance_uid}: corrupt pixel data: "
            f"{type(exc).__name__}: {str(exc)[:200]}"
        ) from exc


def run_model(
    db: Database,
    study_pk: int,
    series: SeriesPlan,
    model: TriageModel,
    volume: Volume | None,
    *,
    load: Callable[[], Volume] | None = None,
    look_up: bool = True,
    record: bool = True,
) -> RecordedResult:
    """The model's result on the series: recorded earlier, or computed now and recorded.

    `volume` may be None when the series was not loaded; `load` is then
    called to load it (only if there is no recorded result). ``look_up=False``
    skips the look-up of a recorded result (the caller did it already;
    recording is idempotent either way); ``record=False`` leaves the recording
    to the caller (:class:`archive.results.NewResult`).

    Raises
    ------
    AnalysisError
        The model raised (``models.registry.ModelError`` or anything else).
    """
    identity = model.identity
    cached = (
        cached_result(
            db,
            series_instance_uid=series.series_instance_uid,
            fingerprint=series.fingerprint,
            model=identity,
            definitions=model.findings,
        )
        if look_up
        else None
    )
    if cached is not None:
        return cached
    if volume is None:
        volume = load() if load is not None else load_volume(series)
    started = time.perf_counter()
    try:
        result = model.predict(volume)
    except Exception as exc:
        raise AnalysisError(
            f"model {identity.name} {identity.version} failed on series "
            f"{series.series_instance_uid}: {type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    seconds = time.perf_counter() - started
    if result.inference_seconds <= 0:
        result = ModelResult(result.model, result.series_instance_uid, result.findings, seconds)
    if record:
        record_result(
            db,
            study_pk=study_pk,
            fingerprint=series.fingerprint,
            result=result,
            mode=str(model.mode),
        )
    return RecordedResult(result, str(model.mode), utcnow(), cached=False)


def report_exists(db: Database, sop_instance_uid: str) -> bool:
    """True if the instance is already in the index (a retried or re-run store)."""
    with db.reader() as session:
        return (
            session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid))
            is not None
        )


def store_report(
    db: Database,
    ingest: Ingest,
    plan: StudyPlan,
    model_results: Sequence[ModelResult],
    *,
    priority: PriorityAssessment | None,
    outcome: AnalysisOutcomeValues,
    failure_reason: str | None,
    generation: int,
    software_versions: str | None = None,
) -> str | None:
    """Build the TID 1500 report and store it in the study like any received instance.

    Idempotent: the report's UIDs depend on the study, the models, the outcome
    and the generation, so a re-run finds it stored and does not build it
    again. Returns its SOP Instance UID, or None when the study has no image
    header to describe (nothing to report on).

    Raises
    ------
    OSError
        The archive could not store it (transient: the flow retries).
    """
    if not plan.headers:
        return None
    _, sop_instance_uid = measurement_report_uids(
        plan.study_instance_uid, model_results, outcome, generation
    )
    if report_exists(db, sop_instance_uid):
        return sop_instance_uid
    sr = build_measurement_report(
        plan.headers,
        model_results,
        priority=priority,
        outcome=outcome,
        failure_reason=failure_reason,
        generation=generation,
        software_versions=software_versions,
    )
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    stored = ingest.store(buffer.getvalue(), calling_ae_title="PACS_TRIAGE_AI", internal=True)
    if not stored.ok:
        raise OSError(
            f"report {sop_instance_uid} not stored: status 0x{stored.status:04X} "
            f"{stored.error_comment}"
        )
    if stored.outcome is StoreOutcomeValues.CONFLICT_KEPT_FIRST:
        logger.info("report %s was already stored (kept the first copy)", sop_instance_uid)
    return sop_instance_uid
