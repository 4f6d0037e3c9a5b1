"""Alerts for critical findings: sent exactly once, with retries, to a real HTTP and MLLP receiver.

The receivers are real servers on loopback (``http.server`` and a TCP socket
speaking MLLP), started by the test; the studies are triaged with the real
archive functions (tests/worklist_support.py).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from archive.config import Hl7Target, Settings, WebhookTarget
from archive.db import Database
from archive.followup import after_triage
from archive.index import DeliveryOutbox, utcnow
from archive.ingest import Ingest
from archive.outbox import deliver_due
from archive.store import FileStore
from tests.worklist_support import MllpReceiver, WebhookReceiver, triaged_study


@pytest.fixture
def node(tmp_path: Path, db: Database) -> tuple[Database, Ingest, FileStore]:
    store = FileStore(tmp_path / "node", fsync=False)
    return db, Ingest(db, store), store


def outbox_rows(db: Database) -> list[DeliveryOutbox]:
    with db.reader() as session:
        return list(session.scalars(select(DeliveryOutbox).order_by(DeliveryOutbox.id)))


def settings_for(tmp_path: Path, **kwargs: object) -> Settings:
    return Settings(
        data_dir=tmp_path / "node",
        fsync=False,
        delivery_backoff_seconds=30,
        delivery_max_attempts=3,
        delivery_timeout_seconds=5,
        **kwargs,
    )


class TestWebhook:
    def test_stat_alert_sent_exactly_once_after_a_retry(
        self, tmp_path: Path, node, caplog: pytest.LogCaptureFixture
    ) -> None:
        db, ingest, store = node
        caplog.set_level(logging.DEBUG)
        with WebhookReceiver(statuses=[503]) as receiver:
            settings = settings_for(
                tmp_path, alert_webhooks=[WebhookTarget(name="ris", url=receiver.url)]
            )
            now = utcnow()
            made = triaged_study(
                db, ingest, settings, probability=0.97, now=now, patient_name="Secret^Alice"
            )
            triaged_study(db, ingest, settings, probability=0.02, now=now)  # routine: no alert

            first = deliver_due(db, settings, store, now=now, clock=lambda: now)
            assert first["pending"] == 1 and first["sent"] == 0
            (row,) = outbox_rows(db)
            assert row.status == "pending" and row.attempts == 1
            assert row.last_error == "DeliveryError: webhook answered HTTP 503"
            assert row.next_attempt_at == now + timedelta(seconds=30)
            # Not due yet: nothing is sent.
            assert deliver_due(db, settings, store, now=now + timedelta(seconds=29))["sent"] == 0

            later = now + timedelta(seconds=31)
            assert deliver_due(db, settings, store, now=later, clock=lambda: later)["sent"] == 1
            # The hook runs again (a retried flow task) and a new pass runs: nothing more.
            after_triage(db, made.study_pk, made.generation, settings=settings, ingest=ingest)
            assert deliver_due(db, settings, store, now=later + timedelta(hours=1)) == {
                "pending": 0,
                "sending": 0,
                "sent": 0,
                "failed": 0,
            }

        assert len(receiver.requests) == 2  # one refused attempt, one delivery
        (headers1, body1), (headers2, body2) = receiver.requests
        assert body1 == body2
        assert headers1["Idempotency-Key"] == headers2["Idempotency-Key"]
        assert body1["StudyInstanceUID"] == made.study_instance_uid
        assert body1["priority_class"] == "STAT"
        assert body1["headline"].startswith("Hemorrhage (p=0.97)")
        assert body1["findings"][0]["present"] is True
        assert body1["worklist_url"].endswith("/worklist")
        assert "PatientName" not in body1 and "PatientID" not in body1
        (row,) = outbox_rows(db)
        assert (row.status, row.attempts, row.sent_at) == ("sent", 2, later)
        assert "Secret" not in caplog.text and "Alice" not in caplog.text

    def test_patient_data_only_when_configured(self, tmp_path: Path, node) -> None:
        db, ingest, store = node
        with WebhookReceiver() as receiver:
            settings = settings_for(
                tmp_path,
                alert_webhooks=[
                    WebhookTarget(name="pager", url=receiver.url, include_patient_data=True)
                ],
            )
            triaged_study(db, ingest, settings, probability=0.97, patient_id="MRN-77")
            assert deliver_due(db, settings, store)["sent"] == 1
        ((_, body),) = receiver.requests
        assert body["PatientID"] == "MRN-77"
        assert body["PatientName"] == "Doe^Jane"

    def test_unreachable_receiver_fails_after_max_attempts(self, tmp_path: Path, node) -> None:
        db, ingest, store = node
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        settings = settings_for(
            tmp_path,
            alert_webhooks=[WebhookTarget(name="down", url=f"http://127.0.0.1:{port}/x")],
        )
        triaged_study(db, ingest, settings, probability=0.97)
        when = utcnow()
        for _attempt in range(3):
            when += timedelta(hours=1)
            deliver_due(db, settings, store, now=when, clock=lambda w=when: w)
        (row,) = outbox_rows(db)
        assert row.status == "failed" and row.attempts == 3
        assert row.last_error.startswith("ConnectError")


class TestHl7:
    def test_oru_over_mllp_once_with_patient_and_finding(self, tmp_path: Path, node) -> None:
        db, ingest, store = node
        with MllpReceiver(codes=["AE"]) as ris:
            settings = settings_for(
                tmp_path,
                alert_hl7=[Hl7Target(name="ris", host="127.0.0.1", port=ris.port)],
            )
            made = triaged_study(
                db, ingest, settings, probability=0.97, patient_id="MRN-42", accession_number="A77"
            )
            now = utcnow()
            assert deliver_due(db, settings, store, now=now, clock=lambda: now)["pending"] == 1
            later = now + timedelta(minutes=5)
            assert deliver_due(db, settings, store, now=later, clock=lambda: later)["sent"] == 1
            assert deliver_due(db, settings, store, now=later + timedelta(hours=1))["sent"] == 0

        assert len(ris.messages) == 2  # refused (AE), then accepted (AA)
        oru = ris.messages[-1]
        assert oru.msh.msh_9.value == "ORU^R01^ORU_R01"
        er7 = oru.to_er7()
        assert "PID|||MRN-42||Doe Jane" in er7
        assert "OBR|1||A77|AITRIAGE^AI triage result" in er7
        assert "50960005^Hemorrhage^SCT" in er7
        assert f"STUDYUID^Study Instance UID^99PACSTRIAGE||{made.study_instance_uid}" in er7
        assert "TRIAGEPRIO^Triage priority^99PACSTRIAGE||STAT" in er7
        (row,) = outbox_rows(db)
        assert row.channel == "hl7:ris" and row.status == "sent"

    def test_routine_result_raises_no_alert(self, tmp_path: Path, node) -> None:
        db, ingest, _store = node
        settings = settings_for(
            tmp_path, alert_hl7=[Hl7Target(name="ris", host="127.0.0.1", port=9)]
        )
        triaged_study(db, ingest, settings, probability=0.02)
        triaged_study(db, ingest, settings, probability=None, failure_reason="corrupt")
        assert outbox_rows(db) == []


@pytest.fixture
def restart_db(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'restart.sqlite'}"
    Database(url).upgrade()
    yield url


def test_sent_alert_is_not_resent_after_a_restart(tmp_path: Path, restart_db: str) -> None:
    """A new process on the same index (a restarted node) finds nothing to send again."""
    with WebhookReceiver() as receiver:
        settings = settings_for(
            tmp_path, alert_webhooks=[WebhookTarget(name="ris", url=receiver.url)]
        )
        db = Database(restart_db)
        store = FileStore(tmp_path / "node", fsync=False)
        made = triaged_study(db, Ingest(db, store), settings, probability=0.97)
        assert deliver_due(db, settings, store)["sent"] == 1
        db.dispose()

        restarted = Database(restart_db)
        after_triage(
            restarted,
            made.study_pk,
            made.generation,
            settings=settings,
            ingest=Ingest(restarted, store),
        )
        assert (
            deliver_due(restarted, settings, store, now=utcnow() + timedelta(days=1))["sent"] == 0
        )
        restarted.dispose()
    assert len(receiver.requests) == 1


def test_delivery_state_is_shown_per_study(tmp_path: Path, node) -> None:
    """``GET /api/worklist/{uid}`` says, per target, whether its alert went out."""
    from fastapi.testclient import TestClient

    from archive.config import HttpToken
    from archive.http import AppContext, TokenBook, create_app

    db, ingest, store = node
    with WebhookReceiver(statuses=[500]) as receiver:
        settings = settings_for(
            tmp_path,
            alert_webhooks=[WebhookTarget(name="pager", url=receiver.url)],
            http_tokens=[HttpToken(name="reader", token="q" * 24, scopes=["read"])],
        )
        made = triaged_study(db, ingest, settings, probability=0.97)
        deliver_due(db, settings, store)
        ctx = AppContext(
            settings=settings,
            db=db,
            file_store=store,
            ingest=ingest,
            tokens=TokenBook.from_settings(settings),
        )
        with TestClient(create_app(ctx)) as client:
            item = client.get(
                f"/api/worklist/{made.study_instance_uid}",
                headers={"Authorization": f"Bearer {'q' * 24}"},
            ).json()
    assert item["alerts"] == [{"channel": "webhook:pager", "status": "pending"}]
    (delivery,) = item["deliveries"]
    assert delivery["channel"] == "webhook:pager"
    assert (delivery["kind"], delivery["status"], delivery["attempts"]) == ("alert", "pending", 1)
    assert delivery["last_error"] == "DeliveryError: webhook answered HTTP 500"


def test_message_claimed_by_a_crashed_sender_goes_out_after_its_lease(tmp_path: Path, node) -> None:
    """A sender that died after claiming leaves the row 'sending'; after the lease it is sent."""
    from archive.outbox import LEASE_SECONDS, claim_due

    db, ingest, store = node
    with WebhookReceiver() as receiver:
        settings = settings_for(
            tmp_path, alert_webhooks=[WebhookTarget(name="ris", url=receiver.url)]
        )
        triaged_study(db, ingest, settings, probability=0.97)
        now = utcnow()
        (claimed,) = claim_due(db, now)  # ... and the process dies here
        assert outbox_rows(db)[0].status == "sending"
        assert deliver_due(db, settings, store, now=now + timedelta(seconds=5))["sent"] == 0
        later = now + timedelta(seconds=LEASE_SECONDS + 1)
        assert deliver_due(db, settings, store, now=later, clock=lambda: later)["sent"] == 1
    ((headers, _body),) = receiver.requests
    assert headers["Idempotency-Key"] == claimed.message_id
    assert outbox_rows(db)[0].status == "sent"
