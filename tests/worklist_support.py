"""Triaged studies made with the real archive functions, for worklist, alert and forward tests.

A study is ingested (synthetic CT slices), marked ready, its job claimed and
started, a TID 1500 report is built with pipeline/report from a model result
and stored into the study, the job is finished with the priority the policy
assigns, and :func:`archive.followup.after_triage` runs, exactly as the triage
flow does it. No mocks: what the worklist reads is what the flow writes. Also
the real receivers alerts go to in tests: a webhook HTTP server and an MLLP
(HL7 v2) server on loopback.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
from hl7apy.core import Message
from hl7apy.parser import parse_message
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from archive.config import Settings
from archive.db import Database
from archive.followup import after_triage
from archive.index import utcnow
from archive.ingest import Ingest
from archive.triage import (
    TriageOutcome,
    TriageStateValues,
    claim_next_job,
    finish_job,
    mark_ready,
    stable_candidates,
    start_analysis,
)
from pipeline.findings import (
    FindingDefinition,
    FindingResult,
    ModelIdentity,
    ModelResult,
    SeverityValues,
)
from pipeline.priority import assess_priority
from pipeline.report import AnalysisOutcomeValues, build_measurement_report
from tests.dicom_factory import ct_dataset, part10_bytes

HEMORRHAGE = FindingDefinition(
    "hemorrhage",
    Code("50960005", "SCT", "Hemorrhage"),
    SeverityValues.CRITICAL,
    0.5,
)
MODEL = ModelIdentity("test-ich", "1.0.0", "ab" * 32)
SLICES = 5


@dataclass(frozen=True)
class MadeStudy:
    study_instance_uid: str
    study_pk: int
    generation: int
    headers: list[pydicom.Dataset]


def ingest_study(
    ingest: Ingest,
    *,
    patient_name: str = "Doe^Jane",
    patient_id: str = "PAT-0001",
    accession_number: str = "ACC0001",
    modality: str = "CT",
    study_date: str = "20260101",
    slices: int = SLICES,
) -> tuple[str, list[pydicom.Dataset]]:
    """Store a small synthetic head CT series; returns its UID and the headers."""
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    headers = []
    for i in range(slices):
        ds = ct_dataset(
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            patient_name=patient_name,
            patient_id=patient_id,
            accession_number=accession_number,
            modality=modality,
            study_date=study_date,
            instance_number=i + 1,
            rows=32,
            columns=32,
            seed=i,
        )
        ds.FrameOfReferenceUID = frame_uid
        result = ingest.store(part10_bytes(ds), calling_ae_title="MODALITY")
        assert result.ok, result
        headers.append(ds)
    return study_uid, headers


def make_ready(db: Database, study_uid: str, now: datetime | None = None) -> int:
    """Mark the study ready (as the stability monitor would) and claim + start its job."""
    (candidate,) = [
        c for c in stable_candidates(db, since=None) if c.study_instance_uid == study_uid
    ]
    generation = mark_ready(db, candidate, now=now)
    assert generation is not None
    return generation


def triage(
    db: Database,
    ingest: Ingest,
    settings: Settings,
    study_uid: str,
    headers: list[pydicom.Dataset],
    *,
    probability: float | None,
    failure_reason: str | None = None,
    now: datetime | None = None,
    follow_up: bool = True,
) -> MadeStudy:
    """Run the triage bookkeeping of one ready study with a given model output.

    `probability` None means no applicable model; `failure_reason` a failed analysis.
    """
    now = now or utcnow()
    job = claim_next_job(db, "test-node", lease_seconds=60, now=now)
    assert job is not None and job.study_instance_uid == study_uid, job
    assert start_analysis(db, job, now=now)
    key = headers[len(headers) // 2]
    if failure_reason is not None:
        results: list[ModelResult] = []
        outcome = AnalysisOutcomeValues.FAILED
        priority = None
    elif probability is None:
        results, outcome, priority = [], AnalysisOutcomeValues.NO_APPLICABLE_MODEL, None
    else:
        results = [
            ModelResult(
                model=MODEL,
                series_instance_uid=str(key.SeriesInstanceUID),
                findings=(
                    FindingResult(
                        HEMORRHAGE,
                        probability,
                        volume_ml=4.2 if probability >= 0.5 else None,
                        key_sop_instance_uid=str(key.SOPInstanceUID),
                    ),
                ),
            )
        ]
        outcome = AnalysisOutcomeValues.COMPLETED
        priority = assess_priority(results)
    sr = build_measurement_report(
        [_header(h) for h in headers],
        results,
        priority=priority,
        outcome=outcome,
        failure_reason=failure_reason,
        generation=job.generation,
        content_datetime=datetime(2026, 1, 1, 12, 0),
    )
    stored = ingest.store(part10_bytes(sr), calling_ae_title="PACS_TRIAGE", internal=True)
    assert stored.ok, stored
    state = {
        AnalysisOutcomeValues.COMPLETED: TriageStateValues.TRIAGED,
        AnalysisOutcomeValues.NO_APPLICABLE_MODEL: TriageStateValues.NO_APPLICABLE_MODEL,
        AnalysisOutcomeValues.FAILED: TriageStateValues.FAILED,
    }[outcome]
    finish_job(
        db,
        job,
        TriageOutcome(
            state,
            failure_reason=failure_reason,
            priority_class=str(priority.priority_class) if priority else None,
            priority_score=priority.score if priority else None,
            priority_reason=priority.reason if priority else None,
            sr_sop_instance_uid=str(sr.SOPInstanceUID),
        ),
        now=now,
    )
    if follow_up:
        after_triage(db, job.study_pk, job.generation, settings=settings, ingest=ingest, now=now)
    return MadeStudy(study_uid, job.study_pk, job.generation, headers)


def _header(ds: pydicom.Dataset) -> pydicom.Dataset:
    copy = pydicom.Dataset(ds)
    del copy.PixelData
    return copy


def triaged_study(
    db: Database,
    ingest: Ingest,
    settings: Settings,
    *,
    probability: float | None,
    failure_reason: str | None = None,
    now: datetime | None = None,
    **study_kwargs: object,
) -> MadeStudy:
    """Ingest, mark ready and triage one study in one go."""
    study_uid, headers = ingest_study(ingest, **study_kwargs)  # type: ignore[arg-type]
    make_ready(db, study_uid, now=now)
    return triage(
        db,
        ingest,
        settings,
        study_uid,
        headers,
        probability=probability,
        failure_reason=failure_reason,
        now=now,
    )


def minutes_ago(now: datetime, minutes: float) -> datetime:
    return now - timedelta(minutes=minutes)


class WebhookReceiver:
    """An HTTP server recording POSTed JSON; answers the given statuses in turn, then 200."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.requests: list[tuple[dict[str, str], dict]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                receiver.requests.append((dict(self.headers), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class MllpReceiver:
    """A RIS stand-in: accepts MLLP-framed HL7 v2 messages and acknowledges each (ACK)."""

    def __init__(self, codes: list[str] | None = None) -> None:
        self.codes = list(codes or [])
        self.messages: list[Message] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                data = b""
                while b"\x1c\x0d" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                text = data[data.find(b"\x0b") + 1 : data.find(b"\x1c\x0d")].decode()
                message = parse_message(text)
                self.messages.append(message)
                code = self.codes.pop(0) if self.codes else "AA"
                ack = Message("ACK", version="2.5")
                ack.msh.msh_3 = "RIS"
                ack.msh.msh_9 = "ACK^R01^ACK"
                ack.msh.msh_10 = "ACK1"
                ack.msh.msh_11 = "P"
                ack.msa.msa_1 = code
                ack.msa.msa_2 = message.msh.msh_10.value
                conn.sendall(b"\x0b" + ack.to_er7().encode() + b"\x1c\x0d")

    def __enter__(self) -> MllpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()
