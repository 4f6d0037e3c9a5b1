"""``/api/cohorts``: list and status with the read scope, create with admin, precise errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from archive.config import HttpToken
from archive.http import AppContext, TokenBook, create_app
from models.testing import make_bundle
from tests.flows.cohort_support import Archive

READ = {"Authorization": "Bearer " + "r" * 20}
ADMIN = {"Authorization": "Bearer " + "a" * 20}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, list[str]]]:
    make_bundle(tmp_path / "models", name="ich", version="1.0", kind="constant")
    archive = Archive.create(
        tmp_path / "data",
        models_dirs=[tmp_path / "models"],
        http_tokens=[
            HttpToken(name="reader", token="r" * 20, scopes=["read"]),
            HttpToken(name="boss", token="a" * 20, scopes=["admin"]),
        ],
    )
    uids = [
        archive.add_phantom(tmp_path / "w", seed, study_date=f"2025010{seed + 1}")
        for seed in range(3)
    ]
    ctx = AppContext(
        settings=archive.settings,
        db=archive.db,
        file_store=archive.file_store,
        ingest=archive.ingest,
        tokens=TokenBook.from_settings(archive.settings),
    )
    with TestClient(create_app(ctx)) as test_client:
        yield test_client, uids
    archive.db.dispose()


class TestCohortApi:
    def test_create_by_query_then_list_and_status(
        self, client: tuple[TestClient, list[str]]
    ) -> None:
        http, uids = client
        body = {"name": "heads", "model": "ich", "query": {"study_date_from": "20250102"}}
        created = http.post("/api/cohorts", json=body, headers=ADMIN)
        assert created.status_code == 201, created.text
        assert created.json()["studies"] == 2
        assert created.json()["selection"]["study_instance_uids"] == uids[1:]
        listed = http.get("/api/cohorts", headers=READ).json()
        assert [c["name"] for c in listed] == ["heads"]
        status = http.get("/api/cohorts/heads", headers=READ).json()
        assert status["counts"]["pending"] == 2 and status["status"] == "created"
        assert status["model"]["version"] == "1.0"

    def test_create_from_uids(self, client: tuple[TestClient, list[str]]) -> None:
        http, uids = client
        body = {"name": "two", "model": "ich", "study_instance_uids": [uids[2], uids[0]]}
        created = http.post("/api/cohorts", json=body, headers=ADMIN)
        assert created.status_code == 201
        assert created.json()["selection"]["study_instance_uids"] == [uids[2], uids[0]]

    def test_errors(self, client: tuple[TestClient, list[str]]) -> None:
        http, uids = client
        ok = {"name": "x", "model": "ich", "query": {}}
        assert http.post("/api/cohorts", json=ok, headers=READ).status_code == 403
        assert http.post("/api/cohorts", json=ok).status_code == 401
        assert http.post("/api/cohorts", json=ok, headers=ADMIN).status_code == 201
        again = http.post("/api/cohorts", json=ok, headers=ADMIN)
        assert again.status_code == 409 and "exists already" in again.json()["detail"]
        unknown = http.post(
            "/api/cohorts", json={**ok, "name": "y", "model": "nope"}, headers=ADMIN
        )
        assert unknown.status_code == 422 and "no installed model nope" in unknown.json()["detail"]
        both = {**ok, "name": "z", "study_instance_uids": uids}
        response = http.post("/api/cohorts", json=both, headers=ADMIN)
        assert response.status_code == 422
        assert response.json()["detail"] == "give exactly one of 'query' and 'study_instance_uids'"
        bad_uid = {"name": "w", "model": "ich", "study_instance_uids": ["1.2.x"]}
        response = http.post("/api/cohorts", json=bad_uid, headers=ADMIN)
        assert response.status_code == 422 and "line 2" in response.json()["detail"]
        assert http.get("/api/cohorts/none", headers=READ).status_code == 404
        assert http.post("/api/cohorts/none/run", headers=ADMIN).status_code == 404
        assert http.post("/api/cohorts/x/run", headers=READ).status_code == 403
