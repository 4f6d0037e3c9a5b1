"""The HTTP service: access control and the triage state endpoint, over a real uvicorn server."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from archive.config import HttpToken, Settings
from archive.db import Database
from archive.http import (
    AppContext,
    HttpService,
    TokenBook,
    create_app,
    ensure_token_file,
    parse_token_file,
)
from archive.index import Study, StudyTriage
from archive.ingest import Ingest
from archive.store import FileStore
from tests.dicom_factory import ct_dataset, part10_bytes

READ_TOKEN = "r" * 20
WRITE_TOKEN = "w" * 20


def _serve(settings: Settings, db: Database) -> HttpService:
    store = FileStore(settings.data_dir, fsync=False)
    ctx = AppContext(
        settings=settings,
        db=db,
        file_store=store,
        ingest=Ingest(db, store, settings.duplicate_policy),
        tokens=TokenBook.from_settings(settings),
    )
    service = HttpService(settings, create_app(ctx))
    service.start()
    return service


@pytest.fixture
def http(tmp_path: Path, db: Database) -> Iterator[tuple[httpx.Client, Database]]:
    settings = Settings(
        data_dir=tmp_path / "node",
        http_port=0,
        http_tokens=[
            HttpToken(name="reader", token=READ_TOKEN, scopes=["read"]),
            HttpToken(name="writer", token=WRITE_TOKEN, scopes=["write"]),
        ],
    )
    service = _serve(settings, db)
    with httpx.Client(base_url=f"http://127.0.0.1:{service.port}") as client:
        yield client, db
    service.stop()


def _store_study(tmp_path: Path, db: Database) -> str:
    ds = ct_dataset()
    store = FileStore(tmp_path / "store", fsync=False)
    result = Ingest(db, store, "keep_first").store(part10_bytes(ds), calling_ae_title="TEST")
    assert result.ok
    return str(ds.StudyInstanceUID)


def test_health_needs_no_token(http: tuple[httpx.Client, Database]) -> None:
    client, _ = http
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_missing_and_unknown_tokens_are_401_with_challenge(
    http: tuple[httpx.Client, Database],
) -> None:
    client, _ = http
    missing = client.get("/api/studies/1.2.3/triage")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = client.get("/api/studies/1.2.3/triage", headers={"Authorization": "Bearer " + "x" * 20})
    assert wrong.status_code == 401
    assert "invalid_token" in wrong.headers["www-authenticate"]


def test_token_without_scope_is_403(http: tuple[httpx.Client, Database]) -> None:
    client, _ = http
    response = client.get(
        "/api/studies/1.2.3/triage", headers={"Authorization": f"Bearer {WRITE_TOKEN}"}
    )
    assert response.status_code == 403
    assert "read" in response.json()["detail"]


def test_cookie_token_is_accepted(http: tuple[httpx.Client, Database]) -> None:
    client, _ = http
    response = client.get("/api/studies/1.2.3/triage", cookies={"pacs_triage_token": READ_TOKEN})
    assert response.status_code == 404


def test_invalid_uid_is_400_and_unknown_study_404(http: tuple[httpx.Client, Database]) -> None:
    client, _ = http
    headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    bad = client.get("/api/studies/1.2.abc/triage", headers=headers)
    assert bad.status_code == 400
    assert "StudyInstanceUID" in bad.json()["detail"]
    assert client.get("/api/studies/1.2.3/triage", headers=headers).status_code == 404


def test_triage_state_of_a_study(tmp_path: Path, http: tuple[httpx.Client, Database]) -> None:
    client, db = http
    uid = _store_study(tmp_path, db)
    headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    waiting = client.get(f"/api/studies/{uid}/triage", headers=headers).json()
    assert waiting["state"] == "waiting_for_images"
    assert waiting["generation"] == 0
    with db.writer() as session:
        study = session.query(Study).filter_by(study_instance_uid=uid).one()
        session.add(
            StudyTriage(
                study_pk=study.id,
                generation=1,
                state="failed",
                ready_at=study.last_received_at + timedelta(seconds=1),
                failure_reason="pixel data could not be decoded",
            )
        )
        session.commit()
    failed = client.get(f"/api/studies/{uid}/triage", headers=headers).json()
    assert failed["state"] == "failed"
    assert failed["failure_reason"] == "pixel data could not be decoded"


def test_token_file_created_once_private_and_used(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "node")
    path = ensure_token_file(settings)
    assert path is not None and path.is_file()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ensure_token_file(settings) is None
    ((token, principal),) = parse_token_file(path)
    assert TokenBook.from_settings(settings).lookup(token) == principal
    assert principal.may("write")


def test_malformed_token_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# comment\n" + "a" * 20 + " read,sudo\n")
    with pytest.raises(ValueError, match=r"tokens:2: .*sudo"):
        parse_token_file(path)


def test_loopback_opens_only_when_configured(tmp_path: Path, db: Database) -> None:
    settings = Settings(data_dir=tmp_path / "node", http_port=0, http_open_on_loopback=True)
    service = _serve(settings, db)
    try:
        response = httpx.get(f"http://127.0.0.1:{service.port}/api/studies/1.2.3/triage")
        assert response.status_code == 404
    finally:
        service.stop()
