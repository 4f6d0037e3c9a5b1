"""The worklist: every study with its triage state, ordered so urgent studies are read first.

Accepts filters and a clock; produces :class:`WorklistItem` rows ordered by
effective priority (:func:`pipeline.priority.effective_priority`: priority
class and score, aged by waiting time so that no study waits past its class's
cap), then by waiting time. Studies without an AI result (still receiving
images, queued, analysing, no applicable model, analysis failed) are listed
too, as ROUTINE with score 0 that ages like any other, and say why; they are
never hidden. Also records what radiologists do with a study (reading state
transitions, validated) and their feedback on the AI result, and computes
the quality figures per model. Never renders HTML and never logs patient data.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select, update

from archive.db import Database, upsert_insert
from archive.index import (
    AiFeedback,
    DeliveryOutbox,
    Patient,
    ReadingStatus,
    Study,
    StudyTriage,
)
from pipeline.priority import (
    DEFAULT_PRIORITY_POLICY,
    PriorityClassValues,
    PriorityPolicy,
    effective_priority,
)


class ReadingStateValues(StrEnum):
    """Where the radiologists stand with a study."""

    UNREAD = "unread"
    OPENED = "opened"
    REPORTED = "reported"
    DISMISSED = "dismissed"


ACTIVE_READING_STATES = (ReadingStateValues.UNREAD, ReadingStateValues.OPENED)

TRANSITIONS: dict[ReadingStateValues, frozenset[ReadingStateValues]] = {
    ReadingStateValues.UNREAD: frozenset({ReadingStateValues.OPENED, ReadingStateValues.DISMISSED}),
    ReadingStateValues.OPENED: frozenset(
        {ReadingStateValues.REPORTED, ReadingStateValues.DISMISSED, ReadingStateValues.UNREAD}
    ),
    ReadingStateValues.REPORTED: frozenset(),
    ReadingStateValues.DISMISSED: frozenset({ReadingStateValues.UNREAD}),
}
"""Allowed reading state changes: opened may be given back (unread); reported is final."""


class WorklistTriageStateValues(StrEnum):
    """The AI state a worklist row shows (``waiting_for_images`` is derived)."""

    WAITING_FOR_IMAGES = "waiting_for_images"
    QUEUED = "queued"
    ANALYSING = "analysing"
    TRIAGED = "triaged"
    NO_APPLICABLE_MODEL = "no_applicable_model"
    FAILED = "failed"


TRIAGE_LABELS = {
    WorklistTriageStateValues.WAITING_FOR_IMAGES: "Waiting for images",
    WorklistTriageStateValues.QUEUED: "Queued for AI",
    WorklistTriageStateValues.ANALYSING: "AI analysing",
    WorklistTriageStateValues.TRIAGED: "Triaged",
    WorklistTriageStateValues.NO_APPLICABLE_MODEL: "No applicable AI model",
    WorklistTriageStateValues.FAILED: "AI could not analyse this study",
}


class VerdictValues(StrEnum):
    """A radiologist's verdict on the AI result."""

    AGREE = "agree"
    DISAGREE = "disagree"


class TransitionError(Exception):
    """A reading state change that the current state does not allow."""


class NotFoundError(Exception):
    """No such study."""


@dataclass
class WorklistFilter:
    """Which studies to list (every field optional; all given ones must match)."""

    reading_states: tuple[ReadingStateValues, ...] = ACTIVE_READING_STATES
    triage_states: tuple[WorklistTriageStateValues, ...] = ()
    modality: str | None = None
    priority_classes: tuple[str, ...] = ()
    """STAT, URGENT, ROUTINE (assessed class) or NONE (no assessment)."""
    study_date_from: str | None = None
    study_date_to: str | None = None
    limit: int = 100
    offset: int = 0


@dataclass
class WorklistItem:
    """One row of the worklist."""

    study_instance_uid: str
    accession_number: str
    patient_id: str
    patient_name: str
    study_date: str
    study_description: str
    modalities_in_study: str
    number_of_study_related_instances: int
    triage_state: str
    triage_label: str
    failure_reason: str | None
    generation: int
    priority_class: str | None
    priority_score: float | None
    priority_reason: str | None
    effective_class: str
    effective_score: float
    overdue: bool
    arrived_at: str
    waiting_seconds: float
    triaged_at: str | None
    reading_state: str
    opened_by: str | None
    opened_at: str | None
    reported_by: str | None
    reported_at: str | None
    headline: str
    findings: list[dict[str, Any]] = field(default_factory=list)
    key_image_sop_instance_uid: str | None = None
    sr_sop_instance_uid: str | None = None
    alerts: list[dict[str, Any]] = field(default_factory=list)
    """Per alert target of the current result: channel, status (pending/sending/sent/failed)."""

    def as_json(self) -> dict[str, Any]:
        """JSON object with DICOM keywords for DICOM attributes."""
        data = asdict(self)
        rename = {
            "study_instance_uid": "StudyInstanceUID",
            "accession_number": "AccessionNumber",
            "patient_id": "PatientID",
            "patient_name": "PatientName",
            "study_date": "StudyDate",
            "study_description": "StudyDescription",
            "modalities_in_study": "ModalitiesInStudy",
            "number_of_study_related_instances": "NumberOfStudyRelatedInstances",
        }
        return {rename.get(k, k): v for k, v in data.items()}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _triage_state(study: Study, triage: StudyTriage | None) -> WorklistTriageStateValues:
    if triage is None or study.last_received_at > triage.ready_at:
        return WorklistTriageStateValues.WAITING_FOR_IMAGES
    return WorklistTriageStateValues(triage.state)


def _headline(
    state: WorklistTriageStateValues, triage: StudyTriage | None, summary: dict[str, Any] | None
) -> str:
    if state is WorklistTriageStateValues.FAILED:
        reason = triage.failure_reason if triage else None
        return f"AI could not analyse this study: {reason or 'reason unknown'}"
    if summary and state is WorklistTriageStateValues.TRIAGED:
        return str(summary.get("headline") or "")
    if state is WorklistTriageStateValues.TRIAGED and triage and triage.priority_reason:
        # The follow-up has not read the SR yet (a moment after the result): the policy's reason.
        return triage.priority_reason
    return TRIAGE_LABELS[state]


def _row_query():  # type: ignore[no-untyped-def]
    return (
        select(Study, Patient, StudyTriage, ReadingStatus)
        .join(Patient, Patient.id == Study.patient_pk)
        .outerjoin(StudyTriage, StudyTriage.study_pk == Study.id)
        .outerjoin(ReadingStatus, ReadingStatus.study_pk == Study.id)
    )


def _item(
    study: Study,
    patient: Patient,
    triage: StudyTriage | None,
    status: ReadingStatus | None,
    now: datetime,
    policy: PriorityPolicy,
) -> WorklistItem:
    state = _triage_state(study, triage)
    summary = None
    if (
        status is not None
        and status.findings_summary
        and triage is not None
        and status.summary_generation == triage.generation
    ):
        summary = json.loads(status.findings_summary)
    assessed = state is WorklistTriageStateValues.TRIAGED and triage and triage.priority_class
    priority_class = triage.priority_class if assessed and triage else None
    score = float(triage.priority_score or 0.0) if assessed and triage else 0.0
    aged = effective_priority(
        priority_class or PriorityClassValues.ROUTINE,
        min(max(score, 0.0), 100.0),
        study.first_received_at,
        now,
        policy,
    )
    return WorklistItem(
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        patient_id=patient.patient_id,
        patient_name=patient.patient_name,
        study_date=study.study_date,
        study_description=study.study_description,
        modalities_in_study=study.modalities_in_study,
        number_of_study_related_instances=study.number_of_study_related_instances,
        triage_state=state.value,
        triage_label=TRIAGE_LABELS[state],
        failure_reason=triage.failure_reason
        if triage and state is WorklistTriageStateValues.FAILED
        else None,
        generation=triage.generation if triage else 0,
        priority_class=priority_class,
        priority_score=score if priority_class else None,
        priority_reason=triage.priority_reason if assessed and triage else None,
        effective_class=aged.effective_class.value,
        effective_score=round(aged.score, 3),
        overdue=aged.overdue,
        arrived_at=study.first_received_at.isoformat(),
        waiting_seconds=aged.waiting.total_seconds(),
        triaged_at=_iso(triage.finished_at) if triage and state.value == triage.state else None,
        reading_state=status.reading_state if status else ReadingStateValues.UNREAD.value,
        opened_by=status.opened_by if status else None,
        opened_at=_iso(status.opened_at) if status else None,
        reported_by=status.reported_by if status else None,
        reported_at=_iso(status.reported_at) if status else None,
        headline=_headline(state, triage, summary),
        findings=list(summary.get("findings", [])) if summary else [],
        key_image_sop_instance_uid=status.key_image_sop_instance_uid
        if status and summary
        else None,
        sr_sop_instance_uid=triage.sr_sop_instance_uid if triage else None,
    )


def list_worklist(
    db: Database,
    flt: WorklistFilter,
    now: datetime,
    policy: PriorityPolicy = DEFAULT_PRIORITY_POLICY,
) -> tuple[list[WorklistItem], int]:
    """The filtered worklist, ordered, and the total before paging.

    Ordering: effective score (class band and score, aged; overdue studies
    first, longest overdue first), then waiting time, longest first. The
    order is computed from a few columns of every matching study; only the
    requested page is loaded in full.
    """
    study, triage, status = Study.__table__, StudyTriage.__table__, ReadingStatus.__table__
    query = select(
        study.c.id,
        study.c.study_instance_uid,
        study.c.first_received_at,
        study.c.last_received_at,
        triage.c.state,
        triage.c.ready_at,
        triage.c.priority_class,
        triage.c.priority_score,
    ).select_from(
        study.outerjoin(triage, triage.c.study_pk == study.c.id).outerjoin(
            status, status.c.study_pk == study.c.id
        )
    )
    if flt.reading_states:
        states = [s.value for s in flt.reading_states]
        if ReadingStateValues.UNREAD.value in states:
            query = query.where(
                (status.c.reading_state.in_(states)) | (status.c.study_pk.is_(None))
            )
        else:
            query = query.where(status.c.reading_state.in_(states))
    if flt.modality:
        query = query.where(study.c.modalities_in_study.contains(flt.modality.upper()))
    if flt.study_date_from:
        query = query.where(study.c.study_date >= flt.study_date_from)
    if flt.study_date_to:
        query = query.where(study.c.study_date <= flt.study_date_to)
    wanted_states = {s.value for s in flt.triage_states}
    wanted_classes = {p.upper() for p in flt.priority_classes}
    ranked: list[tuple[tuple[float, float, str], int]] = []
    with db.reader() as session:
        rows = session.execute(query).all()
    for row in rows:
        # The same derivation as _item, on the columns alone.
        if row.state is None or row.last_received_at > row.ready_at:
            state = WorklistTriageStateValues.WAITING_FOR_IMAGES.value
        else:
            state = row.state
        if wanted_states and state not in wanted_states:
            continue
        assessed = state == WorklistTriageStateValues.TRIAGED.value and row.priority_class
        priority_class = row.priority_class if assessed else None
        if wanted_classes and (priority_class or "NONE") not in wanted_classes:
            continue
        score = float(row.priority_score or 0.0) if assessed else 0.0
        aged = effective_priority(
            priority_class or PriorityClassValues.ROUTINE,
            min(max(score, 0.0), 100.0),
            row.first_received_at,
            now,
            policy,
        )
        key = (-round(aged.score, 3), -aged.waiting.total_seconds(), row.study_instance_uid)
        ranked.append((key, row.id))
    ranked.sort()
    page = [study_pk for _, study_pk in ranked[flt.offset : flt.offset + flt.limit]]
    if not page:
        return [], len(ranked)
    with db.reader() as session:
        full = session.execute(_row_query().where(Study.id.in_(page))).all()
    by_pk = {row[0].id: _item(*row, now=now, policy=policy) for row in full}
    _attach_alerts(db, by_pk)
    return [by_pk[pk] for pk in page if pk in by_pk], len(ranked)


def _attach_alerts(db: Database, items: dict[int, WorklistItem]) -> None:
    """Fill each item's ``alerts`` with the delivery state of its current result's alerts."""
    if not items:
        return
    table = DeliveryOutbox.__table__
    with db.reader() as session:
        rows = session.execute(
            select(table.c.study_pk, table.c.generation, table.c.channel, table.c.status)
            .where(table.c.study_pk.in_(list(items)), table.c.kind == "alert")
            .order_by(table.c.channel)
        ).all()
    for study_pk, generation, channel, status in rows:
        item = items[study_pk]
        if generation == item.generation:
            item.alerts.append({"channel": channel, "status": status})


def get_item(
    db: Database,
    study_instance_uid: str,
    now: datetime,
    policy: PriorityPolicy = DEFAULT_PRIORITY_POLICY,
) -> tuple[int, WorklistItem]:
    """One study's worklist row and its primary key; :class:`NotFoundError` if unknown."""
    with db.reader() as session:
        row = session.execute(
            _row_query().where(Study.study_instance_uid == study_instance_uid)
        ).one_or_none()
    if row is None:
        raise NotFoundError(study_instance_uid)
    item = _item(*row, now=now, policy=policy)
    _attach_alerts(db, {row[0].id: item})
    return row[0].id, item


def change_reading_state(
    db: Database,
    study_instance_uid: str,
    new_state: ReadingStateValues | str,
    who: str,
    now: datetime,
) -> ReadingStateValues:
    """Move a study to `new_state`; raises :class:`TransitionError` if not allowed.

    Returns the previous state. Setting the state a study already has is
    allowed and changes nothing (a second click does no harm).
    """
    new_state = ReadingStateValues(new_state)
    with db.write_connection() as conn:
        study_pk = conn.execute(
            select(Study.id).where(Study.study_instance_uid == study_instance_uid)
        ).scalar_one_or_none()
        if study_pk is None:
            raise NotFoundError(study_instance_uid)
        current_text = conn.execute(
            select(ReadingStatus.reading_state).where(ReadingStatus.study_pk == study_pk)
        ).scalar_one_or_none()
        current = ReadingStateValues(current_text or ReadingStateValues.UNREAD)
        if new_state is current:
            return current
        if new_state not in TRANSITIONS[current]:
            raise TransitionError(f"a study that is {current} cannot become {new_state}")
        values: dict[str, Any] = {"reading_state": new_state.value, "updated_at": now}
        if new_state is ReadingStateValues.OPENED:
            values.update(opened_by=who[:64], opened_at=now)
        elif new_state is ReadingStateValues.REPORTED:
            values.update(reported_by=who[:64], reported_at=now)
        elif new_state is ReadingStateValues.DISMISSED:
            values.update(dismissed_by=who[:64], dismissed_at=now)
        else:
            values.update(opened_by=None, opened_at=None)
        inserted = 0
        if current_text is None:
            # The follow-up may create the row at the same moment: then update it instead.
            inserted = conn.execute(
                upsert_insert(db.dialect)(ReadingStatus.__table__)
                .values(study_pk=study_pk, **values)
                .on_conflict_do_nothing(index_elements=["study_pk"])
            ).rowcount
        if not inserted:
            changed = conn.execute(
                update(ReadingStatus.__table__)
                .where(ReadingStatus.study_pk == study_pk, ReadingStatus.reading_state == current)
                .values(**values)
            ).rowcount
            if not changed:
                raise TransitionError("the study's reading state changed meanwhile; reload")
    return current


def add_feedback(
    db: Database,
    study_instance_uid: str,
    verdict: VerdictValues | str,
    comment: str,
    who: str,
    now: datetime,
    finding: str | None = None,
) -> dict[str, Any]:
    """Record a verdict on the study's current AI result.

    Raises :class:`TransitionError` when the study has no AI result to judge.
    """
    verdict = VerdictValues(verdict)
    study_pk, item = get_item(db, study_instance_uid, now)
    if item.triage_state != WorklistTriageStateValues.TRIAGED.value:
        raise TransitionError(f"the study has no AI result to judge (state {item.triage_state})")
    models = sorted({f.get("model", "") for f in item.findings if f.get("model")})
    row = {
        "study_pk": study_pk,
        "generation": item.generation,
        "verdict": verdict.value,
        "finding": finding[:128] if finding else None,
        "model_name": ",".join(models)[:128] or None,
        "priority_class": item.priority_class,
        "comment": comment,
        "given_by": who[:64],
        "created_at": now,
    }
    with db.write_connection() as conn:
        feedback_id = conn.execute(
            AiFeedback.__table__.insert().values(**row).returning(AiFeedback.id)
        ).scalar_one()
    return {
        "id": feedback_id,
        "StudyInstanceUID": study_instance_uid,
        **{k: v for k, v in row.items() if k not in ("study_pk", "created_at")},
        "created_at": now.isoformat(),
    }


def export_feedback(db: Database, since: datetime | None = None) -> list[dict[str, Any]]:
    """Every feedback row (newest first), with study and accession, for quality review."""
    query = (
        select(AiFeedback, Study.study_instance_uid, Study.accession_number)
        .join(Study, Study.id == AiFeedback.study_pk)
        .order_by(AiFeedback.created_at.desc(), AiFeedback.id.desc())
    )
    if since is not None:
        query = query.where(AiFeedback.created_at >= since)
    with db.reader() as session:
        rows = session.execute(query).all()
    return [
        {
            "id": fb.id,
            "StudyInstanceUID": uid,
            "AccessionNumber": accession,
            "generation": fb.generation,
            "verdict": fb.verdict,
            "finding": fb.finding,
            "model_name": fb.model_name,
            "priority_class": fb.priority_class,
            "comment": fb.comment,
            "given_by": fb.given_by,
            "created_at": fb.created_at.isoformat(),
        }
        for fb, uid, accession in rows
    ]


def quality(db: Database, now: datetime, window: timedelta) -> list[dict[str, Any]]:
    """Per model over the window: studies analysed and flagged, feedback, PPV, false alerts.

    A study is *flagged* by a model when one of its findings was judged
    present. PPV is agreements / verdicts on flagged studies; the false-alert
    rate is disagreements / verdicts on flagged studies. Time to triage is
    from "ready" to the final state.
    """
    since = now - window
    with db.reader() as session:
        rows = session.execute(
            select(StudyTriage, ReadingStatus.findings_summary, ReadingStatus.summary_generation)
            .outerjoin(ReadingStatus, ReadingStatus.study_pk == StudyTriage.study_pk)
            .where(StudyTriage.finished_at >= since, StudyTriage.state == "triaged")
        ).all()
        verdicts = session.execute(
            select(AiFeedback.study_pk, AiFeedback.generation, AiFeedback.verdict).where(
                AiFeedback.created_at >= since
            )
        ).all()
    latest: dict[tuple[int, int], str] = {}
    for study_pk, generation, verdict in verdicts:
        latest[(study_pk, generation)] = verdict  # rows come in insertion order
    models: dict[str, dict[str, Any]] = {}
    for triage, summary_text, summary_generation in rows:
        if not summary_text or summary_generation != triage.generation:
            continue
        summary = json.loads(summary_text) or {}
        by_model: dict[str, bool] = {}
        for finding in summary.get("findings", []):
            name = f"{finding.get('model', '')} {finding.get('model_version', '')}".strip()
            by_model[name] = by_model.get(name, False) or bool(finding.get("present"))
        verdict = latest.get((triage.study_pk, triage.generation))
        for name, flagged in by_model.items():
            entry = models.setdefault(
                name,
                {"analysed": 0, "flagged": 0, "agree": 0, "disagree": 0, "times": []},
            )
            entry["analysed"] += 1
            if triage.finished_at and triage.ready_at:
                entry["times"].append((triage.finished_at - triage.ready_at).total_seconds())
            if flagged:
                entry["flagged"] += 1
                if verdict == VerdictValues.AGREE.value:
                    entry["agree"] += 1
                elif verdict == VerdictValues.DISAGREE.value:
                    entry["disagree"] += 1
    result = []
    for name, entry in sorted(models.items()):
        judged = entry["agree"] + entry["disagree"]
        result.append(
            {
                "model": name,
                "studies_analysed": entry["analysed"],
                "studies_flagged": entry["flagged"],
                "feedback_on_flagged": judged,
                "positive_predictive_value": entry["agree"] / judged if judged else None,
                "false_alert_rate": entry["disagree"] / judged if judged else None,
                "median_time_to_triage_seconds": statistics.median(entry["times"])
                if entry["times"]
                else None,
            }
        )
    return result


def change_token(db: Database) -> str:
    """A value that changes whenever anything the worklist shows changes (for live updates)."""
    with db.reader() as session:
        values = session.execute(
            select(
                func.max(StudyTriage.updated_at),
                func.count(StudyTriage.study_pk),
            )
        ).one()
        reading = session.execute(
            select(func.max(ReadingStatus.updated_at), func.count(ReadingStatus.study_pk))
        ).one()
        studies = session.execute(
            select(func.max(Study.last_received_at), func.count(Study.id))
        ).one()
        deliveries = session.execute(
            select(
                func.count(DeliveryOutbox.id),
                func.max(DeliveryOutbox.sent_at),
                func.sum(DeliveryOutbox.attempts),
            )
        ).one()
    return "|".join(str(v) for v in (*values, *reading, *studies, *deliveries))
