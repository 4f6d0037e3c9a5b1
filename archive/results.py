"""Model results in the index: the triage result cache and the research results table.

Accepts a :class:`pipeline.findings.ModelResult` with the series it came from
and records it as one ``model_result`` row (findings as JSON); given a series
fingerprint and a model identity, returns the recorded result so a re-run of
the same model on the same images costs one query instead of an inference.
Never runs a model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from archive.db import Database, upsert_insert
from archive.index import ModelResultRecord, utcnow
from pipeline.findings import FindingDefinition, FindingResult, ModelIdentity, ModelResult


def series_fingerprint(instances: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over (SOP Instance UID, file SHA-256) pairs of a series, in UID order.

    Any instance added, removed or replaced gives another fingerprint, so a
    cached result is only reused for exactly the images it was computed on.
    """
    digest = hashlib.sha256()
    for sop_instance_uid, sha256 in sorted(instances):
        digest.update(f"{sop_instance_uid}\0{sha256}\n".encode())
    return digest.hexdigest()


def findings_to_json(findings: Sequence[FindingResult]) -> str:
    """The findings of a result as a JSON list (concepts stay with the model's definitions)."""
    return json.dumps(
        [
            {
                "key": f.definition.key,
                "probability": f.probability,
                "present": f.present,
                "volume_ml": f.volume_ml,
                "location": list(f.location) if f.location is not None else None,
                "key_sop_instance_uid": f.key_sop_instance_uid,
            }
            for f in findings
        ],
        sort_keys=True,
    )


def findings_from_json(
    text: str, definitions: Sequence[FindingDefinition]
) -> tuple[FindingResult, ...]:
    """Rebuild findings from :func:`findings_to_json` with the model's definitions.

    Raises
    ------
    KeyError
        If the stored result names a finding the model no longer declares.
    """
    by_key = {d.key: d for d in definitions}
    return tuple(
        FindingResult(
            definition=by_key[item["key"]],
            probability=float(item["probability"]),
            volume_ml=item.get("volume_ml"),
            location=tuple(item["location"]) if item.get("location") else None,  # type: ignore[arg-type]
            key_sop_instance_uid=item.get("key_sop_instance_uid"),
        )
        for item in json.loads(text)
    )


@dataclass(frozen=True)
class RecordedResult:
    """A model result read back from the index."""

    result: ModelResult
    mode: str
    created_at: datetime
    cached: bool
    """True when read from an earlier run (the model did not run this time)."""


def cached_result(
    db: Database,
    *,
    series_instance_uid: str,
    fingerprint: str,
    model: ModelIdentity,
    definitions: Sequence[FindingDefinition],
) -> RecordedResult | None:
    """The recorded result of `model` on exactly these images, if any."""
    with db.reader() as session:
        row = session.scalars(
            select(ModelResultRecord).where(
                ModelResultRecord.series_instance_uid == series_instance_uid,
                ModelResultRecord.series_fingerprint == fingerprint,
                ModelResultRecord.model_name == model.name,
                ModelResultRecord.model_version == model.version,
                ModelResultRecord.weights_sha256 == model.weights_sha256,
            )
        ).one_or_none()
    if row is None:
        return None
    try:
        findings = findings_from_json(row.findings, definitions)
    except (KeyError, ValueError, TypeError):
        return None  # the model's declaration changed: run it again
    return RecordedResult(
        ModelResult(model, series_instance_uid, findings, row.inference_seconds),
        row.mode,
        row.created_at,
        cached=True,
    )


@dataclass(frozen=True)
class NewResult:
    """A result computed now, to be recorded (with the study's bookkeeping, in one transaction)."""

    study_pk: int
    fingerprint: str
    result: ModelResult
    mode: str


def record_results(conn: Any, dialect: str, results: Sequence[NewResult]) -> None:
    """Record `results` on an open write connection; a second record of the same
    (images, model) is ignored (idempotent)."""
    if not results:
        return
    insert = upsert_insert(dialect)
    now = utcnow()
    statement = insert(ModelResultRecord.__table__).on_conflict_do_nothing()
    conn.execute(
        statement,
        [
            {
                "study_pk": new.study_pk,
                "series_instance_uid": new.result.series_instance_uid,
                "series_fingerprint": new.fingerprint,
                "model_name": new.result.model.name,
                "model_version": new.result.model.version,
                "weights_sha256": new.result.model.weights_sha256,
                "mode": str(new.mode),
                "findings": findings_to_json(new.result.findings),
                "inference_seconds": float(new.result.inference_seconds),
                "created_at": now,
            }
            for new in results
        ],
    )


def record_result(
    db: Database,
    *,
    study_pk: int,
    fingerprint: str,
    result: ModelResult,
    mode: str,
    now: datetime | None = None,
) -> None:
    """Record `result`; a second record of the same (images, model) is ignored (idempotent)."""
    insert = upsert_insert(db.dialect)
    statement = insert(ModelResultRecord.__table__).values(
        study_pk=study_pk,
        series_instance_uid=result.series_instance_uid,
        series_fingerprint=fingerprint,
        model_name=result.model.name,
        model_version=result.model.version,
        weights_sha256=result.model.weights_sha256,
        mode=str(mode),
        findings=findings_to_json(result.findings),
        inference_seconds=float(result.inference_seconds),
        created_at=now or utcnow(),
    )
    with db.write_connection() as conn:
        conn.execute(statement.on_conflict_do_nothing())
