"""The worklist API: ordering (priority, score, aging cap), honest states, transitions, feedback.

Studies are made with the real archive functions (ingest, mark_ready, claim,
SR stored, finish_job, after_triage; see tests/worklist_support.py) on SQLite
and PostgreSQL; the API runs in the real FastAPI application with real tokens.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select, update

from archive.config import HttpToken, Settings
from archive.db import Database
from archive.followup import after_triage
from archive.http import AppContext, TokenBook, create_app
from archive.index import Instance, Series, Study, utcnow
from archive.ingest import Ingest
from archive.store import FileStore
from archive.triage import claim_next_job, start_analysis
from tests.worklist_support import ingest_study, make_ready, triaged_study

READ_TOKEN = "r" * 24
WRITE_TOKEN = "w" * 24
READ = {"Authorization": f"Bearer {READ_TOKEN}"}
WRITE = {"Authorization": f"Bearer {WRITE_TOKEN}"}


@dataclass
class Env:
    client: TestClient
    db: Database
    ingest: Ingest
    settings: Settings
    ctx: AppContext

    def set_clock(self, when: datetime) -> None:
        self.ctx.extras["clock"] = lambda: when

    def arrived(self, study_uid: str, when: datetime) -> None:
        """Say the study's first image arrived at `when` (what the aging rule measures)."""
        with self.db.write_connection() as conn:
            conn.execute(
                update(Study.__table__)
                .where(Study.study_instance_uid == study_uid)
                .values(first_received_at=when)
            )


@pytest.fixture
def env(tmp_path: Path, db: Database) -> Iterator[Env]:
    settings = Settings(
        data_dir=tmp_path / "node",
        fsync=False,
        http_tokens=[
            HttpToken(name="reader", token=READ_TOKEN, scopes=["read"]),
            HttpToken(name="dr-writer", token=WRITE_TOKEN, scopes=["read", "write"]),
        ],
    )
    store = FileStore(settings.data_dir, fsync=False)
    ingest = Ingest(db, store)
    ctx = AppContext(
        settings=settings,
        db=db,
        file_store=store,
        ingest=ingest,
        tokens=TokenBook.from_settings(settings),
    )
    with TestClient(create_app(ctx)) as client:
        yield Env(client, db, ingest, settings, ctx)


def uids(response) -> list[str]:  # type: ignore[no-untyped-def]
    assert response.status_code == 200, response.text
    return [item["StudyInstanceUID"] for item in response.json()["items"]]


class TestOrdering:
    def test_stat_before_near_miss_before_negative_before_failed(self, env: Env) -> None:
        now = utcnow()
        negative = triaged_study(env.db, env.ingest, env.settings, probability=0.02, now=now)
        failed = triaged_study(
            env.db, env.ingest, env.settings, probability=None, failure_reason="corrupt", now=now
        )
        stat = triaged_study(env.db, env.ingest, env.settings, probability=0.97, now=now)
        near_miss = triaged_study(env.db, env.ingest, env.settings, probability=0.4, now=now)
        for made in (negative, failed, stat, near_miss):
            env.arrived(made.study_instance_uid, now - timedelta(minutes=1))
        env.set_clock(now)

        response = env.client.get("/api/worklist", headers=READ)

        assert uids(response) == [
            stat.study_instance_uid,
            near_miss.study_instance_uid,
            negative.study_instance_uid,
            failed.study_instance_uid,
        ]
        top = response.json()["items"][0]
        assert top["priority_class"] == "STAT"
        assert top["headline"].startswith("Hemorrhage (p=0.97)")
        assert top["key_image_sop_instance_uid"]

    def test_higher_score_first_within_a_class(self, env: Env) -> None:
        now = utcnow()
        lower = triaged_study(env.db, env.ingest, env.settings, probability=0.91, now=now)
        higher = triaged_study(env.db, env.ingest, env.settings, probability=0.99, now=now)
        for made in (lower, higher):
            env.arrived(made.study_instance_uid, now)
        env.set_clock(now)
        assert uids(env.client.get("/api/worklist", headers=READ)) == [
            higher.study_instance_uid,
            lower.study_instance_uid,
        ]

    def test_equal_priority_longest_waiting_first(self, env: Env) -> None:
        now = utcnow()
        first = triaged_study(env.db, env.ingest, env.settings, probability=0.02, now=now)
        second = triaged_study(env.db, env.ingest, env.settings, probability=0.02, now=now)
        env.arrived(first.study_instance_uid, now - timedelta(minutes=5))
        env.arrived(second.study_instance_uid, now - timedelta(minutes=50))
        # Same score and class; the aged score already favours the longer wait.
        env.set_clock(now)
        assert uids(env.client.get("/api/worklist", headers=READ)) == [
            second.study_instance_uid,
            first.study_instance_uid,
        ]

    def test_routine_study_past_its_cap_rises_above_a_fresh_stat(self, env: Env) -> None:
        start = utcnow()
        routine = triaged_study(env.db, env.ingest, env.settings, probability=0.02, now=start)
        stat = triaged_study(env.db, env.ingest, env.settings, probability=0.97, now=start)
        env.arrived(routine.study_instance_uid, start)

        # 20 h later the routine study is still below its 24 h cap: a new STAT goes first.
        env.set_clock(start + timedelta(hours=20))
        env.arrived(stat.study_instance_uid, start + timedelta(hours=20) - timedelta(minutes=1))
        assert uids(env.client.get("/api/worklist", headers=READ)) == [
            stat.study_instance_uid,
            routine.study_instance_uid,
        ]

        # At 25 h it is overdue and rises above a STAT that arrived a minute ago.
        env.set_clock(start + timedelta(hours=25))
        env.arrived(stat.study_instance_uid, start + timedelta(hours=25) - timedelta(minutes=1))
        response = env.client.get("/api/worklist", headers=READ)
        assert uids(response) == [routine.study_instance_uid, stat.study_instance_uid]
        top = response.json()["items"][0]
        assert top["overdue"] is True
        assert top["priority_class"] == "ROUTINE"
        assert top["effective_score"] == pytest.approx(101.0)


class TestStates:
    def test_every_triage_state_is_listed_honestly(self, env: Env) -> None:
        waiting, _ = ingest_study(env.ingest)
        queued, _ = ingest_study(env.ingest)
        make_ready(env.db, queued)
        analysing, _ = ingest_study(env.ingest)
        make_ready(env.db, analysing)
        job = claim_next_job(env.db, "node", lease_seconds=60)
        assert job is not None and job.study_instance_uid == queued
        # The first claim took `queued`; give it back by finishing nothing: claim the next.
        job2 = claim_next_job(env.db, "node", lease_seconds=60)
        assert job2 is not None and job2.study_instance_uid == analysing
        assert start_analysis(env.db, job2)
        no_model = triaged_study(env.db, env.ingest, env.settings, probability=None)
        failed = triaged_study(
            env.db,
            env.ingest,
            env.settings,
            probability=None,
            failure_reason="pixel data could not be decoded",
        )
        triaged = triaged_study(env.db, env.ingest, env.settings, probability=0.97)

        items = {
            i["StudyInstanceUID"]: i
            for i in env.client.get("/api/worklist", headers=READ).json()["items"]
        }

        assert items[waiting]["triage_state"] == "waiting_for_images"
        assert items[queued]["triage_state"] == "queued"
        assert items[analysing]["triage_state"] == "analysing"
        assert items[no_model.study_instance_uid]["triage_state"] == "no_applicable_model"
        assert items[no_model.study_instance_uid]["headline"] == "No applicable AI model"
        failed_item = items[failed.study_instance_uid]
        assert failed_item["triage_state"] == "failed"
        assert failed_item["triage_label"] == "AI could not analyse this study"
        assert failed_item["headline"] == (
            "AI could not analyse this study: pixel data could not be decoded"
        )
        assert failed_item["failure_reason"] == "pixel data could not be decoded"
        assert items[triaged.study_instance_uid]["triage_state"] == "triaged"

    def test_filters_by_priority_state_modality_and_date(self, env: Env) -> None:
        stat = triaged_study(env.db, env.ingest, env.settings, probability=0.97)
        failed = triaged_study(
            env.db, env.ingest, env.settings, probability=None, failure_reason="corrupt"
        )
        mr = triaged_study(
            env.db, env.ingest, env.settings, probability=0.02, modality="MR", study_date="20250101"
        )
        get = env.client.get
        assert uids(get("/api/worklist?priority=STAT", headers=READ)) == [stat.study_instance_uid]
        assert uids(get("/api/worklist?triage_state=failed", headers=READ)) == [
            failed.study_instance_uid
        ]
        assert uids(get("/api/worklist?modality=MR", headers=READ)) == [mr.study_instance_uid]
        assert uids(get("/api/worklist?study_date_to=2025-12-31", headers=READ)) == [
            mr.study_instance_uid
        ]
        page = get("/api/worklist?limit=1&offset=1", headers=READ).json()
        assert page["total"] == 3 and len(page["items"]) == 1
        bad = get("/api/worklist?triage_state=lost", headers=READ)
        assert bad.status_code == 400 and "triage_state: unknown value 'lost'" in bad.text
        assert get("/api/worklist?study_date_from=1st+May", headers=READ).status_code == 400
        assert get("/api/worklist?priority=ASAP", headers=READ).status_code == 400

    def test_worklist_needs_a_token(self, env: Env) -> None:
        assert env.client.get("/api/worklist").status_code == 401


class TestReadingState:
    def test_open_then_report_records_who_and_when(self, env: Env) -> None:
        made = triaged_study(env.db, env.ingest, env.settings, probability=0.97)
        when = utcnow()
        env.set_clock(when)
        url = f"/api/worklist/{made.study_instance_uid}/state"

        opened = env.client.post(url, json={"state": "opened"}, headers=WRITE)
        assert opened.status_code == 200, opened.text
        assert opened.json()["previous_state"] == "unread"
        assert opened.json()["reading_state"] == "opened"
        assert opened.json()["opened_by"] == "dr-writer"
        assert opened.json()["opened_at"] == when.isoformat()

        reported = env.client.post(url, json={"state": "reported"}, headers=WRITE)
        assert reported.status_code == 200
        assert reported.json()["reported_by"] == "dr-writer"
        # Reported studies leave the default list but stay listed under "all".
        assert uids(env.client.get("/api/worklist", headers=READ)) == []
        assert uids(env.client.get("/api/worklist?reading_state=all", headers=READ)) == [
            made.study_instance_uid
        ]
        assert uids(env.client.get("/api/worklist?reading_state=reported", headers=READ)) == [
            made.study_instance_uid
        ]

    def test_illegal_transitions_are_409(self, env: Env) -> None:
        made = triaged_study(env.db, env.ingest, env.settings, probability=0.97)
        url = f"/api/worklist/{made.study_instance_uid}/state"
        unread_to_reported = env.client.post(url, json={"state": "reported"}, headers=WRITE)
        assert unread_to_reported.status_code == 409
        assert unread_to_reported.json()["detail"] == (
            "a study that is unread cannot become reported"
        )
        assert env.client.post(url, json={"state": "opened"}, headers=WRITE).status_code == 200
        assert env.client.post(url, json={"state": "reported"}, headers=WRITE).status_code == 200
        reopened = env.client.post(url, json={"state": "opened"}, headers=WRITE)
        assert reopened.status_code == 409
        # Repeating the current state is harmless.
        assert env.client.post(url, json={"state": "reported"}, headers=WRITE).status_code == 200

    def test_bad_requests(self, env: Env) -> None:
        made = triaged_study(env.db, env.ingest, env.settings, probability=0.97)
        url = f"/api/worklist/{made.study_instance_uid}/state"
        assert env.client.post(url, json={"state": "opened"}, headers=READ).status_code == 403
        assert env.client.post(url, json={"state": "read"}, headers=WRITE).status_code == 422
        assert (
            env.client.post(
                "/api/worklist/1.2.3.4/state", json={"state": "opened"}, headers=WRITE
            ).status_code
            == 404
        )
        bad_uid = env.client.post(
            "/api/worklist/1.2.abc/state", json={"state": "opened"}, headers=WRITE
        )
        assert bad_uid.status_code == 400


class TestFeedback:
    def test_feedback_is_stored_exported_and_counted(self, env: Env) -> None:
        stat = triaged_study(env.db, env.ingest, env.settings, probability=0.97)
        other = triaged_study(env.db, env.ingest, env.settings, probability=0.95)
        env.set_clock(utcnow())
        agree = env.client.post(
            f"/api/worklist/{stat.study_instance_uid}/feedback",
            json={"verdict": "agree", "comment": "clear bleed, left frontal"},
            headers=WRITE,
        )
        assert agree.status_code == 201, agree.text
        assert agree.json()["model_name"] == "test-ich"
        assert agree.json()["priority_class"] == "STAT"
        disagree = env.client.post(
            f"/api/worklist/{other.study_instance_uid}/feedback",
            json={"verdict": "disagree", "comment": "calcification, not blood"},
            headers=WRITE,
        )
        assert disagree.status_code == 201

        exported = env.client.get("/api/worklist/feedback", headers=READ).json()["feedback"]
        assert {(f["StudyInstanceUID"], f["verdict"], f["given_by"]) for f in exported} == {
            (stat.study_instance_uid, "agree", "dr-writer"),
            (other.study_instance_uid, "disagree", "dr-writer"),
        }
        as_csv = env.client.get("/api/worklist/feedback?format=csv", headers=READ)
        assert as_csv.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(as_csv.text)))
        assert {r["comment"] for r in rows} == {
            "clear bleed, left frontal",
            "calcification, not blood",
        }

        (model,) = env.client.get("/api/worklist/quality?window=day", headers=READ).json()["models"]
        assert model["model"] == "test-ich 1.0.0"
        assert model["studies_analysed"] == 2
        assert model["studies_flagged"] == 2
        assert model["positive_predictive_value"] == pytest.approx(0.5)
        assert model["false_alert_rate"] == pytest.approx(0.5)
        assert model["median_time_to_triage_seconds"] is not None

    def test_feedback_needs_an_ai_result(self, env: Env) -> None:
        failed = triaged_study(
            env.db, env.ingest, env.settings, probability=None, failure_reason="corrupt"
        )
        response = env.client.post(
            f"/api/worklist/{failed.study_instance_uid}/feedback",
            json={"verdict": "agree"},
            headers=WRITE,
        )
        assert response.status_code == 409
        assert "no AI result to judge" in response.json()["detail"]
        invalid = env.client.post(
            f"/api/worklist/{failed.study_instance_uid}/feedback",
            json={"verdict": "maybe"},
            headers=WRITE,
        )
        assert invalid.status_code == 422


class TestThumbnail:
    def test_key_image_and_middle_slice_thumbnails(self, env: Env) -> None:
        stat = triaged_study(env.db, env.ingest, env.settings, probability=0.97)
        no_model = triaged_study(env.db, env.ingest, env.settings, probability=None)
        # The key image (a >= 512 px Secondary Capture) is shrunk; a 32 px slice is not enlarged.
        for made, longest in ((stat, 128), (no_model, 32)):
            response = env.client.get(
                f"/api/worklist/{made.study_instance_uid}/thumbnail.png?size=128", headers=READ
            )
            assert response.status_code == 200
            assert response.headers["content-type"] == "image/png"
            image = Image.open(io.BytesIO(response.content))
            assert max(image.size) == longest
        # The key image is an RGB Secondary Capture with the finding marked.
        key = Image.open(
            io.BytesIO(
                env.client.get(
                    f"/api/worklist/{stat.study_instance_uid}/thumbnail.png", headers=READ
                ).content
            )
        )
        assert key.mode == "RGB"


class TestPage:
    def test_page_and_login_cookie(self, env: Env) -> None:
        page = env.client.get("/worklist")
        assert page.status_code == 200 and '<table id="worklist">' in page.text
        assert env.client.get("/worklist/static/worklist.js").status_code == 200
        assert env.client.get("/worklist/static/../http.py").status_code == 404
        refused = env.client.post("/api/worklist/session", json={"token": "x" * 30})
        assert refused.status_code == 401
        login = env.client.post("/api/worklist/session", json={"token": READ_TOKEN})
        assert login.status_code == 204
        assert "httponly" in login.headers["set-cookie"].lower()
        assert env.client.get("/api/worklist/whoami").json()["name"] == "reader"
        env.client.delete("/api/worklist/session")
        env.client.cookies.clear()
        assert env.client.get("/api/worklist/whoami").status_code == 401


class TestKeyImage:
    def test_key_image_is_stored_in_the_study_once(self, env: Env) -> None:
        made = triaged_study(env.db, env.ingest, env.settings, probability=0.97)
        after_triage(
            env.db, made.study_pk, made.generation, settings=env.settings, ingest=env.ingest
        )
        with env.db.reader() as session:
            stored = session.execute(
                select(Instance.sop_instance_uid, Instance.sop_class_uid, Series.series_number)
                .join(Series, Series.id == Instance.series_pk)
                .where(Series.study_pk == made.study_pk, Series.modality != "CT")
                .order_by(Series.series_number)
            ).all()
        item = env.client.get(f"/api/worklist/{made.study_instance_uid}", headers=READ).json()
        sr, sc = stored
        assert sr.sop_class_uid == "1.2.840.10008.5.1.4.1.1.88.34"
        assert (sc.sop_class_uid, sc.series_number) == ("1.2.840.10008.5.1.4.1.1.7", 9902)
        assert item["key_image_sop_instance_uid"] == sc.sop_instance_uid

    def test_key_image_can_be_turned_off(self, env: Env) -> None:
        settings = env.settings.model_copy(update={"key_image_enabled": False})
        made = triaged_study(env.db, env.ingest, settings, probability=0.97)
        item = env.client.get(f"/api/worklist/{made.study_instance_uid}", headers=READ).json()
        assert item["key_image_sop_instance_uid"] is None
        assert item["headline"].startswith("Hemorrhage (p=0.97)")
