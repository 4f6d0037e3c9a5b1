"""Critical-finding alerts: a webhook POST of JSON, and an HL7 v2 ORU^R01 over MLLP.

Accepts an outbox message of kind ``alert`` (its payload: the study's UIDs,
accession number, priority and findings, written by :mod:`archive.followup`)
and delivers it to the configured target it names; raises on any failure so
that :mod:`archive.outbox` retries it. Patient ID and Patient's Name go into
a message only when the target is configured to receive them
(``include_patient_data``); they are never logged.

References
----------
HL7 v2.5 chapter 7 (ORU^R01 unsolicited observation) and chapter 2 (MSH, ACK);
HL7 v2 Minimal Lower Layer Protocol (MLLP) framing, HL7 v2.5 Appendix C.
"""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from typing import Any

import httpx
from hl7apy.core import Message
from hl7apy.parser import parse_message
from sqlalchemy import select

from archive.config import Hl7Target, WebhookTarget
from archive.index import Patient, Study
from archive.outbox import DeliveryContext, DeliveryError, OutboxMessage, _target_of

MLLP_START = b"\x0b"
MLLP_END = b"\x1c\x0d"
HL7_VERSION = "2.5"
ACCEPT_CODES = frozenset({"AA", "CA"})


def _patient(ctx: DeliveryContext, study_pk: int) -> dict[str, str]:
    with ctx.db.reader() as session:
        row = session.execute(
            select(Patient.patient_id, Patient.patient_name)
            .join(Study, Study.patient_pk == Patient.id)
            .where(Study.id == study_pk)
        ).one_or_none()
    if row is None:
        return {"PatientID": "", "PatientName": ""}
    return {"PatientID": row.patient_id, "PatientName": row.patient_name}


def webhook_body(message: OutboxMessage, patient: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON an alert webhook receives."""
    body = {
        "event": "ai_triage_alert",
        "message_id": message.message_id,
        "generation": message.generation,
        **message.payload,
    }
    if patient is not None:
        body.update(patient)
    return body


def send_webhook(message: OutboxMessage, ctx: DeliveryContext) -> None:
    """POST the alert as JSON; success is any 2xx answer."""
    target: WebhookTarget = _target_of(ctx.settings.alert_webhooks, message.target_name)
    patient = _patient(ctx, message.study_pk) if target.include_patient_data else None
    response = httpx.post(
        target.url,
        json=webhook_body(message, patient),
        headers={"Idempotency-Key": message.message_id, **target.headers},
        timeout=ctx.settings.delivery_timeout_seconds,
    )
    if not 200 <= response.status_code < 300:
        raise DeliveryError(f"webhook answered HTTP {response.status_code}")


def _hl7_text(value: str, limit: int = 200) -> str:
    # Field, component, repetition, escape and subcomponent separators may not
    # appear in data unescaped (HL7 v2.5 2.7); alert text has no need for them.
    cleaned = "".join(" " if ch in "|^~\\&\r\n" else ch for ch in value)
    return cleaned[:limit]


def build_oru(
    message: OutboxMessage,
    target: Hl7Target,
    patient: dict[str, str] | None,
    now: datetime | None = None,
) -> Message:
    """An ORU^R01 carrying the AI finding as text observations (OBX value type TX).

    OBR-3 (Filler Order Number) holds the Accession Number, OBR-4 names the AI
    triage, OBX-3 codes each finding (SNOMED CT from the SR), OBX-11 is P
    (preliminary: not verified by a radiologist).
    """
    now = now or datetime.now(UTC)
    payload = message.payload
    oru = Message("ORU_R01", version=HL7_VERSION)
    oru.msh.msh_3 = _hl7_text(target.sending_application, 180)
    oru.msh.msh_4 = _hl7_text(target.sending_facility, 180)
    oru.msh.msh_5 = _hl7_text(target.receiving_application, 180)
    oru.msh.msh_6 = _hl7_text(target.receiving_facility, 180)
    oru.msh.msh_7 = now.strftime("%Y%m%d%H%M%S")
    oru.msh.msh_9 = "ORU^R01^ORU_R01"
    oru.msh.msh_10 = f"{message.id}-{message.generation}"
    oru.msh.msh_11 = "P"
    result = oru.add_group("ORU_R01_PATIENT_RESULT")
    patient_group = result.add_group("ORU_R01_PATIENT")
    if patient is not None:
        patient_group.pid.pid_3 = _hl7_text(patient.get("PatientID", ""), 60) or "UNKNOWN"
        patient_group.pid.pid_5 = _hl7_text(patient.get("PatientName", "").replace("^", " "), 200)
    else:
        patient_group.pid.pid_3 = "UNKNOWN"
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    order.obr.obr_1 = "1"
    order.obr.obr_3 = _hl7_text(payload.get("AccessionNumber") or "", 60)
    order.obr.obr_4 = "AITRIAGE^AI triage result"
    order.obr.obr_25 = "P"
    observations = [
        ("TRIAGEPRIO^Triage priority^99PACSTRIAGE", str(payload.get("priority_class") or "")),
        ("AIRESULT^AI result^99PACSTRIAGE", str(payload.get("headline") or "")),
        ("STUDYUID^Study Instance UID^99PACSTRIAGE", message.study_instance_uid),
    ]
    for finding in payload.get("findings", []):
        if not finding.get("present"):
            continue
        scheme, _, value = str(finding.get("code", ":")).partition(":")
        probability = finding.get("probability")
        text = finding.get("finding", "")
        if probability is not None:
            text = f"{text} p={probability:.2f}"
        observations.append(
            (f"{_hl7_text(value, 20)}^{_hl7_text(finding.get('finding', ''), 100)}^{scheme}", text)
        )
    if payload.get("worklist_url"):
        observations.append(("WORKLIST^Worklist^99PACSTRIAGE", str(payload["worklist_url"])))
    for number, (code, text) in enumerate(observations, start=1):
        group = order.add_group("ORU_R01_OBSERVATION")
        group.obx.obx_1 = str(number)
        group.obx.obx_2 = "TX"
        group.obx.obx_3 = code
        group.obx.obx_5 = _hl7_text(text, 1000)
        group.obx.obx_11 = "P"
    return oru


def mllp_exchange(host: str, port: int, message: bytes, timeout: float) -> bytes:
    """Send one MLLP-framed message and return the framed answer's content."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(MLLP_START + message + MLLP_END)
        answer = b""
        while MLLP_END not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                raise DeliveryError("MLLP peer closed the connection without an answer")
            answer += chunk
    start = answer.find(MLLP_START)
    return answer[start + 1 : answer.find(MLLP_END)]


def send_hl7(message: OutboxMessage, ctx: DeliveryContext) -> None:
    """Send the ORU^R01 over MLLP; success is an ACK with MSA-1 AA or CA."""
    target: Hl7Target = _target_of(ctx.settings.alert_hl7, message.target_name)
    patient = _patient(ctx, message.study_pk) if target.include_patient_data else None
    oru = build_oru(message, target, patient)
    answer = mllp_exchange(
        target.host,
        target.port,
        oru.to_er7().encode("utf-8"),
        ctx.settings.delivery_timeout_seconds,
    )
    try:
        ack = parse_message(answer.decode("utf-8", "replace").replace("\n", "\r"))
        code = ack.msa.msa_1.value
        text = ack.msa.msa_3.value if ack.msa.msa_3.value else ""
    except Exception as exc:
        raise DeliveryError(f"unreadable HL7 acknowledgement: {type(exc).__name__}") from None
    if code not in ACCEPT_CODES:
        raise DeliveryError(f"HL7 receiver answered {code} {_hl7_text(text, 80)}".strip())
