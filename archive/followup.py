"""What happens after a study's triage finished: summary, key image, alerts, forwarding.

Accepts the study and the analysis generation whose job just finished (any
final state: triaged, no applicable model, failed). For the current
generation only, it reads the study's newest AI report (the SR) back from the
store and records what the worklist shows (:class:`~archive.index.ReadingStatus`),
stores a Secondary Capture of the key image with the finding marked
(``key_image_enabled``), and writes the alerts (for the priority classes in
``alert_priority_classes``) and the forwards of the results to the
configured destinations into the delivery outbox, in one transaction; the
node's :class:`~archive.outbox.DeliveryService` sends them. Calling it twice
for the same generation changes nothing (idempotent), so the flow may retry.
The dispatcher calls :func:`after_triage` best-effort: an exception here is
logged by the caller and never changes the study's triage state.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut
from pydicom.sr.coding import Code
from sqlalchemy import select, update

from archive import outbox
from archive.db import upsert_insert
from archive.index import Instance, ReadingStatus, Series, Study, StudyTriage, utcnow
from archive.store import FileStore
from pipeline.findings import FindingDefinition, FindingResult, ModelIdentity
from pipeline.keyimage import build_key_image
from pipeline.summary import ReportSummary, SummaryFinding, summarize_report

if TYPE_CHECKING:
    from archive.config import Settings
    from archive.db import Database
    from archive.ingest import Ingest

logger = logging.getLogger(__name__)


def worklist_url(settings: Settings) -> str:
    """The worklist page's address for messages to people (alerts)."""
    if settings.worklist_url:
        return settings.worklist_url
    host = settings.http_host if settings.http_host not in ("0.0.0.0", "::") else "localhost"
    return f"http://{host}:{settings.http_port}/worklist"


def _file_store(settings: Settings, ingest: Ingest | None) -> FileStore:
    return ingest.file_store if ingest is not None else FileStore(settings.data_dir, fsync=False)


def _instance_path(db: Database, sop_instance_uid: str) -> str | None:
    with db.reader() as session:
        return session.scalars(
            select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid)
        ).one_or_none()


def read_summary(db: Database, store: FileStore, sr_sop_instance_uid: str) -> ReportSummary | None:
    """The summary of the stored SR, or None when it is not (or no longer) readable."""
    path = _instance_path(db, sr_sop_instance_uid)
    if path is None:
        logger.warning("AI report %s is not in the archive", sr_sop_instance_uid)
        return None
    try:
        return summarize_report(pydicom.dcmread(store.absolute(path)))
    except Exception as exc:
        logger.warning("AI report %s unreadable: %s", sr_sop_instance_uid, type(exc).__name__)
        return None


def _point_in_image(
    ds: pydicom.Dataset, location: tuple[float, float, float]
) -> tuple[float, float] | None:
    # PS3.3 C.7.6.2.1.1: patient = IPP + col * spacing[1] * row_cos + row * spacing[0] * col_cos.
    try:
        position = np.asarray(ds.ImagePositionPatient, dtype=float)
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        spacing = [float(v) for v in ds.PixelSpacing]
    except (AttributeError, ValueError, TypeError):
        return None
    offset = np.asarray(location, dtype=float) - position
    row = float(offset @ orientation[3:]) / spacing[0]
    column = float(offset @ orientation[:3]) / spacing[1]
    if 0 <= row < int(ds.Rows) and 0 <= column < int(ds.Columns):
        return row, column
    return None


def store_key_image(
    db: Database,
    ingest: Ingest,
    finding: SummaryFinding,
    generation: int,
) -> str | None:
    """Build and store the Secondary Capture of `finding`'s key image; its SOP Instance UID.

    Returns None (and logs why) when the key image is not in the archive or
    cannot be rendered; the triage result stands without it.
    """
    if finding.key_sop_instance_uid is None:
        return None
    path = _instance_path(db, finding.key_sop_instance_uid)
    if path is None:
        logger.warning("key image %s is not in the archive", finding.key_sop_instance_uid)
        return None
    try:
        ds = pydicom.dcmread(ingest.file_store.absolute(path))
        frame = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
        if frame.ndim != 2:
            frame = frame[0] if frame.ndim == 3 else frame
        scheme, _, value = finding.code.partition(":")
        result = FindingResult(
            FindingDefinition(
                key=finding.code, concept=Code(value, scheme, finding.finding), severity="critical"
            ),
            probability=finding.probability or 0.0,
            location=finding.location,
            key_sop_instance_uid=finding.key_sop_instance_uid,
        )
        sc = build_key_image(
            ds,
            frame,
            result,
            ModelIdentity(finding.model, finding.model_version or "unknown", ""),
            point=_point_in_image(ds, finding.location) if finding.location else None,
            generation=generation,
        )
    except Exception as exc:
        logger.warning(
            "key image of %s could not be made: %s: %s",
            finding.key_sop_instance_uid,
            type(exc).__name__,
            str(exc)[:200],
        )
        return None
    from io import BytesIO

    buffer = BytesIO()
    sc.save_as(buffer, enforce_file_format=True)
    stored = ingest.store(buffer.getvalue(), calling_ae_title="PACS_TRIAGE", internal=True)
    if not stored.ok:
        logger.warning("key image %s not stored: 0x%04X", sc.SOPInstanceUID, stored.status)
        return None
    return str(sc.SOPInstanceUID)


def _study_instances(db: Database, study_pk: int) -> list[str]:
    with db.reader() as session:
        return list(
            session.scalars(
                select(Instance.sop_instance_uid)
                .join(Series, Series.id == Instance.series_pk)
                .where(Series.study_pk == study_pk)
                .order_by(Series.series_number, Instance.instance_number, Instance.id)
            )
        )


def after_triage(
    db: Database,
    study_pk: int,
    generation: int,
    *,
    settings: Settings,
    ingest: Ingest | None = None,
    now: datetime | None = None,
) -> None:
    """Act on a finished triage job: worklist summary, key image, alerts, forwards.

    Parameters
    ----------
    db : Database
        The index; the study's row in ``study_triage`` holds the outcome
        (state, priority class/score, failure reason, SR SOP Instance UID).
    study_pk : int
        Primary key of the study (``study.id``).
    generation : int
        The analysis generation that finished; nothing happens if a newer one
        has superseded it (its own job will follow up).
    settings : Settings
        Node settings (alert targets, forwarding destinations, key image on/off).
    ingest : Ingest | None
        The ingest path, to store the key image into the study (no key image
        without it).
    now : datetime | None
        The current time (tests pass a fixed clock).
    """
    now = now or utcnow()
    with db.reader() as session:
        row = session.execute(
            select(StudyTriage, Study)
            .join(Study, Study.id == StudyTriage.study_pk)
            .where(StudyTriage.study_pk == study_pk)
        ).one_or_none()
    if row is None:
        logger.warning("follow-up of study pk %d: no triage state", study_pk)
        return
    triage, study = row
    if triage.generation != generation:
        logger.info(
            "follow-up of study %s generation %d skipped: superseded by generation %d",
            study.study_instance_uid,
            generation,
            triage.generation,
        )
        return
    with db.reader() as session:
        status = session.get(ReadingStatus, study_pk)
        done = status is not None and status.summary_generation == generation
        key_image_uid = status.key_image_sop_instance_uid if done and status else None

    store = _file_store(settings, ingest)
    summary = (
        read_summary(db, store, triage.sr_sop_instance_uid) if triage.sr_sop_instance_uid else None
    )

    present = summary.present_findings if summary else ()
    if (
        not done
        and settings.key_image_enabled
        and ingest is not None
        and triage.state == "triaged"
        and present
    ):
        key_image_uid = store_key_image(db, ingest, present[0], generation)

    payload: dict[str, Any] = {
        "StudyInstanceUID": study.study_instance_uid,
        "AccessionNumber": study.accession_number,
        "ModalitiesInStudy": study.modalities_in_study,
        "state": triage.state,
        "priority_class": triage.priority_class,
        "priority_score": triage.priority_score,
        "headline": summary.headline if summary else (triage.failure_reason or triage.state),
        "findings": summary.as_json()["findings"] if summary else [],
        "sr_sop_instance_uid": triage.sr_sop_instance_uid,
        "key_image_sop_instance_uid": key_image_uid,
        "worklist_url": worklist_url(settings),
        "triaged_at": (triage.finished_at or now).isoformat(),
    }
    alert = triage.state == "triaged" and (triage.priority_class or "") in {
        c.upper() for c in settings.alert_priority_classes
    }
    results = [uid for uid in (triage.sr_sop_instance_uid, key_image_uid) if uid]
    study_instances: list[str] | None = None

    def instances(include_study: bool) -> list[str]:
        nonlocal study_instances
        if not include_study:
            return results
        if study_instances is None:
            study_instances = _study_instances(db, study_pk)
        return list(dict.fromkeys([*study_instances, *results]))

    values = {
        "findings_summary": json.dumps(summary.as_json() if summary else None),
        "summary_generation": generation,
        "key_image_sop_instance_uid": key_image_uid,
        "updated_at": now,
    }
    queued = 0
    with db.write_connection() as conn:
        changed = conn.execute(
            update(ReadingStatus.__table__)
            .where(ReadingStatus.study_pk == study_pk)
            .values(**values)
        ).rowcount
        if not changed:
            conn.execute(
                upsert_insert(conn.dialect.name)(ReadingStatus.__table__)
                .values(study_pk=study_pk, reading_state="unread", **values)
                .on_conflict_do_nothing(index_elements=["study_pk"])
            )
        if alert:
            for target in settings.alert_webhooks:
                queued += outbox.enqueue(
                    conn,
                    study_pk=study_pk,
                    generation=generation,
                    channel=f"webhook:{target.name}",
                    kind=outbox.DeliveryKindValues.ALERT,
                    payload=payload,
                    now=now,
                )
            for target in settings.alert_hl7:
                queued += outbox.enqueue(
                    conn,
                    study_pk=study_pk,
                    generation=generation,
                    channel=f"hl7:{target.name}",
                    kind=outbox.DeliveryKindValues.ALERT,
                    payload=payload,
                    now=now,
                )
        if results:
            for destination in settings.forward_destinations:
                queued += outbox.enqueue(
                    conn,
                    study_pk=study_pk,
                    generation=generation,
                    channel=f"dimse:{destination.name}",
                    kind=outbox.DeliveryKindValues.FORWARD,
                    payload={"instances": instances(destination.include_study)},
                    now=now,
                )
            for service in settings.forward_dicomweb:
                queued += outbox.enqueue(
                    conn,
                    study_pk=study_pk,
                    generation=generation,
                    channel=f"stow:{service.name}",
                    kind=outbox.DeliveryKindValues.FORWARD,
                    payload={"instances": instances(service.include_study)},
                    now=now,
                )
    logger.info(
        "follow-up of study %s generation %d: %s, key image %s, %d message(s) queued",
        study.study_instance_uid,
        generation,
        triage.state,
        key_image_uid or "none",
        queued,
    )
    if queued:
        outbox.wake()
