"""Research cohorts: a named, fixed set of archived studies and one model to run over them.

Accepts a selection (a query over the index, a CSV of Study Instance UIDs or
Accession Numbers, or the studies pulled from a remote PACS by
:mod:`archive.remote`) and produces a saved cohort: one ``cohort`` row (name,
model name, version and weights hash, the selection spec as JSON) and one
``cohort_item`` row per study with a unique (cohort, study) key, so that a run
is reproducible and a crashed run resumes with no study processed twice and
none missed. Also holds the run bookkeeping (claim the next pending study,
record its outcome, put back studies a killed run left "running") and the
lane check that lets clinical triage go first. Never runs a model, never
talks to Prefect (``flows/cohort.py`` does), never logs patient data.

The tables live here rather than in :mod:`archive.index` so that the cohort
feature stays one module; they share the index's declarative base, and the
Alembic revision ``0006_cohorts`` creates them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from archive.db import Database
from archive.index import Base, Patient, Series, Study, TriageJob, UTCDateTime, utcnow
from archive.results import NewResult, record_results
from pipeline.uids import InvalidUIDError, validate_uid

logger = logging.getLogger(__name__)

ERROR_MAX_LENGTH = 1024
NAME_MAX_LENGTH = 64


class CohortStatusValues(StrEnum):
    """Where a cohort run stands."""

    CREATED = "created"
    """Saved, never run."""
    RUNNING = "running"
    """A run is going on (or was killed: a new run takes over once its heartbeat is stale)."""
    DONE = "done"
    """Every study is done, failed or skipped."""


class CohortItemStatusValues(StrEnum):
    """Where one study of a cohort stands."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    """The model's result is recorded (computed now or reused from an earlier run)."""
    FAILED = "failed"
    """Loading or inference failed; ``error`` says why."""
    SKIPPED = "skipped"
    """No series of the study matches the model's selection rule: nothing to analyse."""


FINAL_ITEM_STATES = frozenset(
    {
        CohortItemStatusValues.DONE,
        CohortItemStatusValues.FAILED,
        CohortItemStatusValues.SKIPPED,
    }
)


class Cohort(Base):
    """A saved research cohort: its name, its model and how its studies were chosen."""

    __tablename__ = "cohort"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH), unique=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(
        String(64), comment="SHA-256 of the model weights when the cohort was created"
    )
    selection: Mapped[str] = mapped_column(Text, comment="JSON: how the studies were selected")
    write_sr: Mapped[bool] = mapped_column(
        Boolean, comment="store a research SR into each analysed study"
    )
    status: Mapped[str] = mapped_column(String(16), comment="CohortStatusValues")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    run_id: Mapped[str | None] = mapped_column(
        String(64), nullable=True, comment="the run that owns the cohort now (flow run id)"
    )
    heartbeat_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime(), nullable=True, comment="last sign of life of that run"
    )
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class CohortItem(Base):
    """One study of a cohort and how its analysis went."""

    __tablename__ = "cohort_item"
    __table_args__ = (
        UniqueConstraint("cohort_id", "study_pk", name="uq_cohort_item_cohort_study"),
        Index("ix_cohort_item_status", "cohort_id", "status", "position"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cohort_id: Mapped[int] = mapped_column(ForeignKey("cohort.id"))
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"))
    study_instance_uid: Mapped[str] = mapped_column(
        String(64), comment="(0020,000D) StudyInstanceUID UI"
    )
    position: Mapped[int] = mapped_column(Integer, comment="order of the study in the cohort")
    status: Mapped[str] = mapped_column(String(16), comment="CohortItemStatusValues")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(String(ERROR_MAX_LENGTH), nullable=True)
    cached: Mapped[bool] = mapped_column(
        Boolean, default=False, comment="every result was reused from an earlier run"
    )
    series_analysed: Mapped[int] = mapped_column(Integer, default=0)
    load_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    inference_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    total_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class CohortError(ValueError):
    """A cohort cannot be created or run as asked; the message says why (no patient data)."""


class CohortSelectionError(CohortError):
    """A selection is empty or has bad rows; :attr:`problems` lists each (row number first)."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        detail = "".join(f"\n  {p}" for p in self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(message + detail + more)


# -- selection ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectedStudy:
    """A study chosen for a cohort."""

    study_pk: int
    study_instance_uid: str


@dataclass(frozen=True)
class StudyQuery:
    """Filters over the index; empty fields do not filter. All given filters must match.

    Parameters
    ----------
    patient_ids : list of str
        Patient ID (0010,0020), exact.
    accession_numbers : list of str
        Accession Number (0008,0050), exact.
    study_date_from, study_date_to : str
        Study Date (0008,0020) range, ``YYYYMMDD``, inclusive (PS3.4 C.2.2.2.5 range matching).
    modalities : list of str
        A series of the study has one of these Modality (0008,0060) values.
    study_description : str
        Case-insensitive substring of Study Description (0008,1030).
    body_part : str
        Case-insensitive substring of a series' Body Part Examined (0018,0015).
    analysed_by, not_analysed_by : str
        ``name`` or ``name:version``: the study has (has no) recorded result of that model.
    limit : int
        At most this many studies (oldest Study Date first).
    """

    patient_ids: tuple[str, ...] = ()
    accession_numbers: tuple[str, ...] = ()
    study_date_from: str | None = None
    study_date_to: str | None = None
    modalities: tuple[str, ...] = ()
    study_description: str | None = None
    body_part: str | None = None
    analysed_by: str | None = None
    not_analysed_by: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("patient_ids", "accession_numbers", "modalities"):
            object.__setattr__(self, name, tuple(v for v in getattr(self, name) or () if v))
        for name in ("study_date_from", "study_date_to"):
            value = getattr(self, name)
            if value is not None and not (len(value) == 8 and value.isdigit()):
                raise CohortError(f"StudyQuery.{name} must be a date YYYYMMDD, got {value!r}")
        if self.limit is not None and self.limit < 1:
            raise CohortError("StudyQuery.limit must be at least 1")

    def to_json(self) -> dict[str, Any]:
        """The filters that are set (the cohort's recorded selection)."""
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if value in (None, ()):
                continue
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


def _model_filter(spec: str) -> Any:
    from archive.index import ModelResultRecord

    name, _, version = spec.partition(":")
    condition = and_(ModelResultRecord.study_pk == Study.id, ModelResultRecord.model_name == name)
    if version:
        condition = and_(condition, ModelResultRecord.model_version == version)
    return exists().where(condition)


def select_studies(db: Database, query: StudyQuery) -> list[SelectedStudy]:
    """The studies of the index that match `query`, oldest Study Date first.

    References
    ----------
    PS3.4 C.2.2.2 attribute matching (single value, list of UIDs, range),
    https://dicom.nema.org/medical/dicom/current/output/chtml/part04/sect_C.2.2.2.html
    """
    statement = select(Study.id, Study.study_instance_uid).join(
        Patient, Patient.id == Study.patient_pk
    )
    if query.patient_ids:
        statement = statement.where(Patient.patient_id.in_(query.patient_ids))
    if query.accession_numbers:
        statement = statement.where(Study.accession_number.in_(query.accession_numbers))
    # PS3.4 C.2.2.2.5 range matching: "YYYYMMDD-YYYYMMDD", either end open.
    if query.study_date_from:
        statement = statement.where(Study.study_date >= query.study_date_from)
    if query.study_date_to:
        statement = statement.where(Study.study_date <= query.study_date_to)
    if query.study_description:
        statement = statement.where(
            func.upper(Study.study_description).contains(query.study_description.upper())
        )
    series_conditions = []
    if query.modalities:
        series_conditions.append(Series.modality.in_([m.upper() for m in query.modalities]))
    if query.body_part:
        series_conditions.append(
            func.upper(Series.body_part_examined).contains(query.body_part.upper())
        )
    if series_conditions:
        statement = statement.where(exists().where(Series.study_pk == Study.id, *series_conditions))
    if query.analysed_by:
        statement = statement.where(_model_filter(query.analysed_by))
    if query.not_analysed_by:
        statement = statement.where(~_model_filter(query.not_analysed_by))
    statement = statement.order_by(Study.study_date, Study.study_time, Study.id)
    if query.limit:
        statement = statement.limit(query.limit)
    with db.reader() as session:
        return [SelectedStudy(pk, uid) for pk, uid in session.execute(statement)]


CSV_UID_COLUMN = "StudyInstanceUID"
CSV_ACCESSION_COLUMN = "AccessionNumber"
CSV_PATIENT_COLUMN = "PatientID"


def select_from_csv(db: Database, text: str) -> list[SelectedStudy]:
    """The studies a CSV names, in its row order (duplicates once).

    The CSV has a header row with either a ``StudyInstanceUID`` column, or an
    ``AccessionNumber`` column and optionally ``PatientID`` (which tells apart
    equal Accession Numbers of different patients). Blank lines and lines whose
    first cell starts with ``#`` are ignored.

    Raises
    ------
    CohortSelectionError
        No usable column, or rows that are not valid or match no or several
        studies; every bad row is listed by its line number (values of
        PatientID are never repeated in the message).
    """
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    columns = {c.strip(): c for c in (reader.fieldnames or []) if c}
    by_uid = CSV_UID_COLUMN in columns
    if not by_uid and CSV_ACCESSION_COLUMN not in columns:
        raise CohortSelectionError(
            f"CSV needs a header with a {CSV_UID_COLUMN} or an {CSV_ACCESSION_COLUMN} column "
            f"(found: {', '.join(columns) or 'no header'})"
        )
    problems: list[str] = []
    wanted: list[tuple[int, str, str]] = []  # (line, key, patient id)
    for row in reader:
        line = reader.line_num
        values = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        if not any(values.values()) or next(iter(values.values()), "").startswith("#"):
            continue
        if by_uid:
            raw = values.get(CSV_UID_COLUMN, "")
            try:
                wanted.append((line, validate_uid(raw, CSV_UID_COLUMN), ""))
            except InvalidUIDError as exc:
                problems.append(f"line {line}: {exc}" if raw else f"line {line}: UID empty")
        else:
            accession = values.get(CSV_ACCESSION_COLUMN, "")
            if not accession:
                problems.append(f"line {line}: {CSV_ACCESSION_COLUMN} empty")
            elif len(accession) > 16:
                problems.append(f"line {line}: {CSV_ACCESSION_COLUMN} longer than 16 characters")
            else:
                wanted.append((line, accession, values.get(CSV_PATIENT_COLUMN, "")))

    found: dict[str, list[tuple[int, str, str]]] = {}
    keys = sorted({key for _, key, _ in wanted})
    key_column = Study.study_instance_uid if by_uid else Study.accession_number
    with db.reader() as session:
        for start in range(0, len(keys), 500):
            rows = session.execute(
                select(Study.id, Study.study_instance_uid, Patient.patient_id, key_column)
                .join(Patient, Patient.id == Study.patient_pk)
                .where(key_column.in_(keys[start : start + 500]))
            )
            for pk, uid, patient_id, key in rows:
                found.setdefault(key, []).append((pk, uid, patient_id))
    selected: list[SelectedStudy] = []
    seen: set[int] = set()
    for line, key, patient_id in wanted:
        matches = found.get(key, [])
        if patient_id:
            matches = [m for m in matches if m[2] == patient_id]
        what = f"{CSV_UID_COLUMN} {key}" if by_uid else f"{CSV_ACCESSION_COLUMN} {key!r}"
        if not matches:
            extra = " with that PatientID" if patient_id else ""
            problems.append(f"line {line}: no study with {what}{extra} in the archive")
        elif len(matches) > 1:
            problems.append(
                f"line {line}: {what} matches {len(matches)} studies; add a PatientID column"
            )
        elif matches[0][0] not in seen:
            seen.add(matches[0][0])
            selected.append(SelectedStudy(matches[0][0], matches[0][1]))
    if problems:
        problems.sort(key=lambda p: int(p.split(":", 1)[0].removeprefix("line ")))
        raise CohortSelectionError(f"{len(problems)} bad row(s) in the CSV:", problems)
    return selected


def select_uids(db: Database, study_instance_uids: Iterable[str]) -> list[SelectedStudy]:
    """The studies with these Study Instance UIDs, in the given order.

    Raises
    ------
    CohortSelectionError
        If a UID is invalid or not in the archive.
    """
    text = CSV_UID_COLUMN + "\n" + "\n".join(study_instance_uids) + "\n"
    return select_from_csv(db, text)


# -- the cohort and its items ---------------------------------------------------------------


@dataclass(frozen=True)
class CohortInfo:
    """A cohort as saved, with the count of its studies per status."""

    id: int
    name: str
    model_name: str
    model_version: str
    weights_sha256: str
    selection: dict[str, Any]
    write_sr: bool
    status: CohortStatusValues
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s.value, 0) for s in FINAL_ITEM_STATES)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": {
                "name": self.model_name,
                "version": self.model_version,
                "weights_sha256": self.weights_sha256,
            },
            "selection": self.selection,
            "write_sr": self.write_sr,
            "status": self.status.value,
            "created_at": self.created_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "studies": self.total,
            "counts": {s.value: self.counts.get(s.value, 0) for s in CohortItemStatusValues},
        }


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > NAME_MAX_LENGTH:
        raise CohortError(f"cohort name must be 1 to {NAME_MAX_LENGTH} characters")
    if any(c in name for c in "/\\\0\n\r\t"):
        raise CohortError("cohort name must not contain slashes or control characters")
    return name


def create_cohort(
    db: Database,
    name: str,
    *,
    model_name: str,
    model_version: str,
    weights_sha256: str,
    selection: dict[str, Any],
    studies: Sequence[SelectedStudy],
    write_sr: bool = False,
) -> CohortInfo:
    """Save a cohort with its exact membership (one pending item per study, in order).

    Raises
    ------
    CohortError
        The name is taken or invalid, or there are no studies.
    """
    name = _check_name(name)
    if not studies:
        raise CohortSelectionError("the selection matches no study; nothing to save")
    now = utcnow()
    with db.writer() as session:
        if session.scalar(select(Cohort.id).where(Cohort.name == name)) is not None:
            raise CohortError(f"a cohort named {name!r} exists already")
        cohort = Cohort(
            name=name,
            model_name=model_name,
            model_version=model_version,
            weights_sha256=weights_sha256,
            selection=json.dumps(selection, sort_keys=True),
            write_sr=write_sr,
            status=CohortStatusValues.CREATED.value,
            created_at=now,
        )
        session.add(cohort)
        session.flush()
        cohort_id = cohort.id
        seen: set[int] = set()
        rows = []
        for study in studies:
            if study.study_pk in seen:
                continue
            seen.add(study.study_pk)
            rows.append(
                {
                    "cohort_id": cohort_id,
                    "study_pk": study.study_pk,
                    "study_instance_uid": study.study_instance_uid,
                    "position": len(rows),
                    "status": CohortItemStatusValues.PENDING.value,
                    "attempts": 0,
                    "cached": False,
                    "series_analysed": 0,
                }
            )
        session.execute(CohortItem.__table__.insert(), rows)
    logger.info(
        "cohort %d %r created: %d studies, model %s %s",
        cohort_id,
        name,
        len(rows),
        model_name,
        model_version,
    )
    return get_cohort(db, name)


def _info(session: Any, cohort: Cohort) -> CohortInfo:
    counts = dict(
        session.execute(
            select(CohortItem.status, func.count())
            .where(CohortItem.cohort_id == cohort.id)
            .group_by(CohortItem.status)
        ).all()
    )
    return CohortInfo(
        id=cohort.id,
        name=cohort.name,
        model_name=cohort.model_name,
        model_version=cohort.model_version,
        weights_sha256=cohort.weights_sha256,
        selection=json.loads(cohort.selection),
        write_sr=cohort.write_sr,
        status=CohortStatusValues(cohort.status),
        created_at=cohort.created_at,
        started_at=cohort.started_at,
        finished_at=cohort.finished_at,
        counts=counts,
    )


def get_cohort(db: Database, name: str) -> CohortInfo:
    """The cohort `name` with its counts.

    Raises
    ------
    LookupError
        No cohort has that name.
    """
    with db.reader() as session:
        cohort = session.scalars(select(Cohort).where(Cohort.name == name)).one_or_none()
        if cohort is None:
            raise LookupError(f"no cohort named {name!r}")
        return _info(session, cohort)


def list_cohorts(db: Database) -> list[CohortInfo]:
    """Every cohort, newest first."""
    with db.reader() as session:
        cohorts = session.scalars(select(Cohort).order_by(Cohort.created_at.desc(), Cohort.id))
        return [_info(session, c) for c in cohorts.all()]


@dataclass(frozen=True)
class ClaimedItem:
    """A study of a cohort that this run now analyses."""

    id: int
    cohort_id: int
    study_pk: int
    study_instance_uid: str
    attempts: int


def begin_run(
    db: Database, cohort_id: int, run_id: str, *, stale_after_seconds: float = 120.0
) -> int:
    """Make `run_id` the owner of the cohort and put back what an earlier run left running.

    A killed run leaves its in-flight studies ``running`` and its heartbeat
    ageing; a new run takes over once the heartbeat is older than
    `stale_after_seconds` (or at once, if it is the same run id). Returns how
    many studies were put back to pending.

    Raises
    ------
    CohortError
        Another run owns the cohort and is alive.
    """
    now = utcnow()
    table = Cohort.__table__
    items = CohortItem.__table__
    with db.write_connection() as conn:
        row = conn.execute(
            select(table.c.run_id, table.c.heartbeat_at, table.c.status).where(
                table.c.id == cohort_id
            )
        ).one()
        if (
            row.status == CohortStatusValues.RUNNING.value
            and row.run_id not in (None, run_id)
            and row.heartbeat_at is not None
            and now - row.heartbeat_at < timedelta(seconds=stale_after_seconds)
        ):
            raise CohortError(
                f"cohort is being run by {row.run_id} (alive "
                f"{int((now - row.heartbeat_at).total_seconds())} s ago); wait for it to stop"
            )
        put_back = conn.execute(
            update(items)
            .where(
                items.c.cohort_id == cohort_id,
                items.c.status == CohortItemStatusValues.RUNNING.value,
            )
            .values(status=CohortItemStatusValues.PENDING.value)
        ).rowcount
        conn.execute(
            update(table)
            .where(table.c.id == cohort_id)
            .values(
                status=CohortStatusValues.RUNNING.value,
                run_id=run_id,
                heartbeat_at=now,
                started_at=now,
                finished_at=None,
            )
        )
    if put_back:
        logger.warning(
            "cohort %d: %d study(ies) left running by an interrupted run put back",
            cohort_id,
            put_back,
        )
    return int(put_back or 0)


def heartbeat(db: Database, cohort_id: int, run_id: str) -> bool:
    """Record that `run_id` is alive; False if another run has taken the cohort over."""
    table = Cohort.__table__
    with db.write_connection() as conn:
        return bool(
            conn.execute(
                update(table)
                .where(table.c.id == cohort_id, table.c.run_id == run_id)
                .values(heartbeat_at=utcnow())
            ).rowcount
        )


def claim_next_item(db: Database, cohort_id: int) -> ClaimedItem | None:
    """Take the first pending study of the cohort (in cohort order) and mark it running."""
    items = CohortItem.__table__
    with db.write_connection() as conn:
        query = (
            select(items.c.id, items.c.study_pk, items.c.study_instance_uid, items.c.attempts)
            .where(
                items.c.cohort_id == cohort_id,
                items.c.status == CohortItemStatusValues.PENDING.value,
            )
            .order_by(items.c.position)
            .limit(1)
        )
        if db.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        row = conn.execute(query).one_or_none()
        if row is None:
            return None
        conn.execute(
            update(items)
            .where(items.c.id == row.id)
            .values(
                status=CohortItemStatusValues.RUNNING.value,
                attempts=items.c.attempts + 1,
                started_at=utcnow(),
                error=None,
            )
        )
    return ClaimedItem(row.id, cohort_id, row.study_pk, row.study_instance_uid, row.attempts + 1)


def pending_items(db: Database, cohort_id: int, limit: int | None = None) -> list[tuple[int, int]]:
    """(item id, study pk) of the cohort's pending studies, in cohort order (nothing claimed)."""
    items = CohortItem.__table__
    query = (
        select(items.c.id, items.c.study_pk)
        .where(
            items.c.cohort_id == cohort_id,
            items.c.status == CohortItemStatusValues.PENDING.value,
        )
        .order_by(items.c.position)
    )
    if limit is not None:
        query = query.limit(limit)
    with db.reader() as session:
        return [(item_id, study_pk) for item_id, study_pk in session.execute(query)]


@dataclass(frozen=True)
class Claim:
    """What :func:`claim_item` found: the claimed study, or why none was claimed."""

    item: ClaimedItem | None = None
    clinical_waiting: int = 0
    """Clinical triage jobs queued or running: nothing was claimed, wait and ask again."""
    owner: bool = True
    """False when another run has taken the cohort over: stop, claim nothing more."""


def claim_item(
    db: Database,
    cohort_id: int,
    item_id: int,
    run_id: str,
    *,
    stale_pending_seconds: float | None = None,
    finished: tuple[int, ItemOutcome] | None = None,
) -> Claim:
    """Mark one pending study running for `run_id`, in one write transaction.

    The same transaction checks that `run_id` still owns the cohort and, when
    `stale_pending_seconds` is given, that no clinical triage job is queued or
    running (:func:`clinical_work_waiting`): clinical work first, one study at
    a time. `finished` (item id, outcome) records the study done before in the
    same transaction (as :func:`finish_item`), whether or not this claim
    succeeds: one round trip per study. A study that is no longer pending
    (done by another run) is not claimed (``Claim().item`` is None).
    """
    items = CohortItem.__table__
    table = Cohort.__table__
    now = utcnow()
    conditions = [
        items.c.id == item_id,
        items.c.cohort_id == cohort_id,
        items.c.status == CohortItemStatusValues.PENDING.value,
        exists().where(table.c.id == cohort_id, table.c.run_id == run_id),
    ]
    if stale_pending_seconds is not None:
        conditions.append(~exists().where(_clinical_waiting_condition(stale_pending_seconds, now)))
    with db.write_connection() as conn:
        if finished is not None:
            _finish(conn, db.dialect, *finished)
        # The common case in one statement; the reasons for no claim are looked up after.
        row = conn.execute(
            update(items)
            .where(*conditions)
            .values(
                status=CohortItemStatusValues.RUNNING.value,
                attempts=items.c.attempts + 1,
                started_at=now,
                error=None,
            )
            .returning(items.c.study_pk, items.c.study_instance_uid, items.c.attempts)
        ).one_or_none()
        if row is not None:
            return Claim(
                ClaimedItem(item_id, cohort_id, row.study_pk, row.study_instance_uid, row.attempts)
            )
        owner = conn.execute(select(table.c.run_id).where(table.c.id == cohort_id)).scalar()
        if owner != run_id:
            return Claim(owner=False)
        if stale_pending_seconds is not None:
            waiting = _clinical_count(conn, stale_pending_seconds, now)
            if waiting:
                return Claim(clinical_waiting=waiting)
    return Claim()


def release_item(db: Database, item_id: int) -> None:
    """Put a running study back to pending (its analysis hit a transient error; retry it)."""
    items = CohortItem.__table__
    with db.write_connection() as conn:
        conn.execute(
            update(items)
            .where(items.c.id == item_id, items.c.status == CohortItemStatusValues.RUNNING.value)
            .values(status=CohortItemStatusValues.PENDING.value)
        )


def fail_running_items(db: Database, item_ids: Sequence[int], reason: str) -> int:
    """Record the running studies among `item_ids` as failed; returns how many were claimed.

    For a run whose chunk of studies failed as a whole: its running studies
    must not stay running, and its pending ones stay pending for the next run.
    The count is of the studies no longer pending (claimed by the run).
    """
    items = CohortItem.__table__
    with db.write_connection() as conn:
        conn.execute(
            update(items)
            .where(
                items.c.id.in_(item_ids),
                items.c.status == CohortItemStatusValues.RUNNING.value,
            )
            .values(
                status=CohortItemStatusValues.FAILED.value,
                error=reason[:ERROR_MAX_LENGTH],
                finished_at=utcnow(),
            )
        )
        return int(
            conn.execute(
                select(func.count())
                .select_from(items)
                .where(
                    items.c.id.in_(item_ids),
                    items.c.status != CohortItemStatusValues.PENDING.value,
                )
            ).scalar_one()
        )


@dataclass(frozen=True)
class ItemOutcome:
    """How the analysis of one cohort study ended."""

    status: CohortItemStatusValues
    error: str | None = None
    cached: bool = False
    series_analysed: int = 0
    load_seconds: float = 0.0
    inference_seconds: float = 0.0
    total_seconds: float = 0.0
    sr_sop_instance_uid: str | None = None
    new_results: tuple[NewResult, ...] = ()
    """Results computed now: :func:`finish_item` records them with the outcome, atomically."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", CohortItemStatusValues(self.status))
        if self.status not in FINAL_ITEM_STATES:
            raise ValueError(f"ItemOutcome.status must be final, got {self.status}")
        if self.status is CohortItemStatusValues.FAILED and not self.error:
            raise ValueError("ItemOutcome.error is required for a failed study")


def finish_item(db: Database, item_id: int, outcome: ItemOutcome) -> None:
    """Record how the study's analysis ended, and its new results, in one transaction."""
    with db.write_connection() as conn:
        _finish(conn, db.dialect, item_id, outcome)


def _finish(conn: Any, dialect: str, item_id: int, outcome: ItemOutcome) -> None:
    items = CohortItem.__table__
    record_results(conn, dialect, outcome.new_results)
    conn.execute(
        update(items)
        .where(items.c.id == item_id)
        .values(
            status=outcome.status.value,
            error=(outcome.error or "")[:ERROR_MAX_LENGTH] or None,
            cached=outcome.cached,
            series_analysed=outcome.series_analysed,
            load_seconds=outcome.load_seconds,
            inference_seconds=outcome.inference_seconds,
            total_seconds=outcome.total_seconds,
            sr_sop_instance_uid=outcome.sr_sop_instance_uid,
            finished_at=utcnow(),
        )
    )


def end_run(db: Database, cohort_id: int, run_id: str) -> CohortStatusValues:
    """Close the run: the cohort is done when no study is pending or running."""
    items = CohortItem.__table__
    table = Cohort.__table__
    with db.write_connection() as conn:
        open_items = conn.execute(
            select(func.count())
            .select_from(items)
            .where(
                items.c.cohort_id == cohort_id,
                items.c.status.in_(
                    [CohortItemStatusValues.PENDING.value, CohortItemStatusValues.RUNNING.value]
                ),
            )
        ).scalar_one()
        status = CohortStatusValues.DONE if open_items == 0 else CohortStatusValues.RUNNING
        conn.execute(
            update(table)
            .where(table.c.id == cohort_id, table.c.run_id == run_id)
            .values(
                status=status.value,
                finished_at=utcnow() if status is CohortStatusValues.DONE else None,
                heartbeat_at=None,
            )
        )
    return status


def reopen_failed(db: Database, cohort_id: int) -> int:
    """Put the cohort's failed studies back to pending (to retry them in the next run)."""
    items = CohortItem.__table__
    with db.write_connection() as conn:
        return int(
            conn.execute(
                update(items)
                .where(
                    items.c.cohort_id == cohort_id,
                    items.c.status == CohortItemStatusValues.FAILED.value,
                )
                .values(status=CohortItemStatusValues.PENDING.value)
            ).rowcount
            or 0
        )


# -- the lane: clinical triage first --------------------------------------------------------


def clinical_work_waiting(
    db: Database, *, stale_pending_seconds: float, now: datetime | None = None
) -> int:
    """How many clinical triage jobs are queued or running right now.

    Counts outbox jobs that are pending (created within the last
    `stale_pending_seconds`: older pending jobs mean no dispatcher is taking
    jobs, and a research run must not wait for ever on them) or running with a
    live lease. A cohort runner waits while this is above zero.
    """
    with db.reader() as session:
        return _clinical_count(session, stale_pending_seconds, now or utcnow())


def _clinical_waiting_condition(stale_pending_seconds: float, now: datetime) -> Any:
    job = TriageJob.__table__
    return or_(
        and_(
            job.c.status == "pending",
            job.c.created_at >= now - timedelta(seconds=stale_pending_seconds),
        ),
        and_(job.c.status == "running", job.c.lease_expires_at >= now),
    )


def _clinical_count(conn: Any, stale_pending_seconds: float, now: datetime) -> int:
    return int(
        conn.execute(
            select(func.count())
            .select_from(TriageJob.__table__)
            .where(_clinical_waiting_condition(stale_pending_seconds, now))
        ).scalar_one()
    )
