"""The delivery outbox: alerts and forwarded results, each sent exactly once, with retries.

Accepts messages to send (:func:`enqueue`: one row per study, analysis
generation and channel, written in the caller's transaction so a crash can
neither lose nor double one) and sends them (:func:`deliver_due`, run by
:class:`DeliveryService` in the node): a due row is claimed with a lease,
handed to the sender of its channel kind (``webhook``, ``hl7``, ``dimse``,
``stow``), and marked ``sent`` once the receiver acknowledged it; a failed
attempt is retried with exponential backoff until ``delivery_max_attempts``,
then marked ``failed`` with the error. Receivers get a stable message id
(``Idempotency-Key`` / MSH-10 / the SOP Instance UIDs) so the rare resend after
a crash between "acknowledged" and "marked sent" can be recognised.

Never logs patient data: log lines carry the channel, the outbox id and UIDs.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, and_, or_, select, update

from archive.config import Settings
from archive.db import Database, upsert_insert
from archive.index import DeliveryOutbox, Study, utcnow
from archive.store import FileStore

logger = logging.getLogger(__name__)

LEASE_SECONDS = 120.0
ERROR_MAX_LENGTH = 1024


class DeliveryStatusValues(StrEnum):
    """Where an outbox message stands."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


class DeliveryKindValues(StrEnum):
    """Why a message is sent."""

    ALERT = "alert"
    FORWARD = "forward"


class DeliveryError(Exception):
    """A delivery attempt failed; the message says why (no patient data)."""


@dataclass(frozen=True)
class OutboxMessage:
    """A claimed outbox row, as a sender gets it."""

    id: int
    study_pk: int
    study_instance_uid: str
    generation: int
    channel: str
    kind: str
    payload: dict[str, Any]
    attempts: int

    @property
    def channel_kind(self) -> str:
        """``webhook``, ``hl7``, ``dimse`` or ``stow``."""
        return self.channel.split(":", 1)[0]

    @property
    def target_name(self) -> str:
        """The configured target's name."""
        return self.channel.split(":", 1)[1]

    @property
    def message_id(self) -> str:
        """A stable id of this message, the same on every attempt."""
        return f"pacs-triage-{self.study_instance_uid}-{self.generation}-{self.channel}"[:199]


@dataclass(frozen=True)
class DeliveryContext:
    """What senders need besides the message."""

    settings: Settings
    db: Database
    file_store: FileStore


Sender = Callable[[OutboxMessage, DeliveryContext], None]
"""Sends one message or raises (any exception is a failed attempt)."""


def _target_of(targets: Sequence[Any], name: str) -> Any:
    """The configured target called `name` (a delivery to a removed target fails)."""
    for target in targets:
        if target.name == name:
            return target
    raise DeliveryError(f"target {name!r} is no longer configured")


def enqueue(
    conn: Connection,
    *,
    study_pk: int,
    generation: int,
    channel: str,
    kind: DeliveryKindValues | str,
    payload: dict[str, Any],
    now: datetime,
) -> bool:
    """Add a message unless this (study, generation, channel) already has one.

    Returns True if a row was added. Call inside the transaction that records
    why the message is owed.
    """
    result = conn.execute(
        upsert_insert(conn.dialect.name)(DeliveryOutbox.__table__)
        .values(
            study_pk=study_pk,
            generation=generation,
            channel=channel,
            kind=DeliveryKindValues(kind).value,
            status=DeliveryStatusValues.PENDING.value,
            payload=json.dumps(payload, sort_keys=True),
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["study_pk", "generation", "channel"])
    )
    return bool(result.rowcount)


def claim_due(
    db: Database, now: datetime, *, limit: int = 20, lease_seconds: float = LEASE_SECONDS
) -> list[OutboxMessage]:
    """Lease the due messages (pending and due, or sending with an expired lease)."""
    table = DeliveryOutbox.__table__
    due = or_(
        and_(
            table.c.status == DeliveryStatusValues.PENDING.value,
            table.c.next_attempt_at <= now,
        ),
        and_(
            table.c.status == DeliveryStatusValues.SENDING.value,
            table.c.lease_expires_at < now,
        ),
    )
    # Most passes find nothing: look first without taking the (SQLite) write lock.
    with db.reader() as session:
        if session.execute(select(table.c.id).where(due).limit(1)).first() is None:
            return []
    with db.write_connection() as conn:
        query = (
            select(table.c.id).where(due).order_by(table.c.next_attempt_at, table.c.id).limit(limit)
        )
        if db.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        ids = list(conn.execute(query).scalars())
        if not ids:
            return []
        conn.execute(
            update(table)
            .where(table.c.id.in_(ids))
            .values(
                status=DeliveryStatusValues.SENDING.value,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
            )
        )
        rows = conn.execute(
            select(
                table.c.id,
                table.c.study_pk,
                Study.study_instance_uid,
                table.c.generation,
                table.c.channel,
                table.c.kind,
                table.c.payload,
                table.c.attempts,
            )
            .join(Study.__table__, Study.id == table.c.study_pk)
            .where(table.c.id.in_(ids))
            .order_by(table.c.next_attempt_at, table.c.id)
        ).all()
    return [
        OutboxMessage(
            r.id,
            r.study_pk,
            r.study_instance_uid,
            r.generation,
            r.channel,
            r.kind,
            json.loads(r.payload),
            r.attempts,
        )
        for r in rows
    ]


def backoff(settings: Settings, attempts: int) -> timedelta:
    """Wait before attempt number ``attempts + 1``: base * 2^(attempts-1), capped."""
    seconds = settings.delivery_backoff_seconds * (2 ** max(0, attempts - 1))
    return timedelta(seconds=min(seconds, settings.delivery_backoff_max_seconds))


def _record(
    db: Database,
    message: OutboxMessage,
    settings: Settings,
    now: datetime,
    error: str | None,
) -> str:
    table = DeliveryOutbox.__table__
    attempts = message.attempts + 1
    if error is None:
        values: dict[str, Any] = {
            "status": DeliveryStatusValues.SENT.value,
            "sent_at": now,
            "last_error": None,
        }
    elif attempts >= settings.delivery_max_attempts:
        values = {"status": DeliveryStatusValues.FAILED.value, "last_error": error}
    else:
        values = {
            "status": DeliveryStatusValues.PENDING.value,
            "next_attempt_at": now + backoff(settings, attempts),
            "last_error": error,
        }
    with db.write_connection() as conn:
        conn.execute(
            update(table)
            .where(table.c.id == message.id)
            .values(attempts=attempts, lease_expires_at=None, **values)
        )
    return str(values["status"])


def _senders() -> dict[str, Sender]:
    from archive import alerts, forward

    return {
        "webhook": alerts.send_webhook,
        "hl7": alerts.send_hl7,
        "dimse": forward.send_dimse,
        "stow": forward.send_stow,
    }


def deliver_due(
    db: Database,
    settings: Settings,
    file_store: FileStore,
    *,
    now: datetime | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> dict[str, int]:
    """Send every due message once; returns counts by resulting status.

    `now` fixes the time used to select due messages (tests); attempts are
    recorded at `clock()`.
    """
    counts = {s.value: 0 for s in DeliveryStatusValues}
    senders = _senders()
    context = DeliveryContext(settings, db, file_store)
    for message in claim_due(db, now or clock()):
        sender = senders.get(message.channel_kind)
        try:
            if sender is None:
                raise DeliveryError(f"unknown channel kind {message.channel_kind!r}")
            sender(message, context)
            error = None
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:ERROR_MAX_LENGTH]
        status = _record(db, message, settings, clock(), error)
        counts[status] += 1
        if error is None:
            logger.info(
                "outbox %d %s for study %s generation %d sent",
                message.id,
                message.channel,
                message.study_instance_uid,
                message.generation,
            )
        else:
            logger.warning(
                "outbox %d %s for study %s attempt %d: %s (now %s)",
                message.id,
                message.channel,
                message.study_instance_uid,
                message.attempts + 1,
                error,
                status,
            )
    return counts


_wake = threading.Event()


def wake() -> None:
    """Ask the delivery service of this process to look for due messages now."""
    _wake.set()


class DeliveryService:
    """A node thread that sends due outbox messages (every `interval` s, or when woken)."""

    def __init__(
        self, db: Database, settings: Settings, file_store: FileStore, interval: float = 1.0
    ) -> None:
        self.db = db
        self.settings = settings
        self.file_store = file_store
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="delivery", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                deliver_due(self.db, self.settings, self.file_store)
            except Exception:
                logger.exception("delivery pass failed")
            _wake.wait(self.interval)
            _wake.clear()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        _wake.set()
        if self._thread is not None:
            self._thread.join(timeout)


def delivery_status(db: Database, study_pk: int) -> list[dict[str, Any]]:
    """Per channel, the newest generation's delivery state of a study (for the API)."""
    table = DeliveryOutbox.__table__
    with db.reader() as session:
        rows = session.execute(
            select(
                table.c.channel,
                table.c.kind,
                table.c.generation,
                table.c.status,
                table.c.attempts,
                table.c.last_error,
                table.c.sent_at,
            )
            .where(table.c.study_pk == study_pk)
            .order_by(table.c.generation.desc(), table.c.channel)
        ).all()
    return [
        {
            "channel": r.channel,
            "kind": r.kind,
            "generation": r.generation,
            "status": r.status,
            "attempts": r.attempts,
            "last_error": r.last_error,
            "sent_at": r.sent_at.isoformat() if r.sent_at else None,
        }
        for r in rows
    ]
