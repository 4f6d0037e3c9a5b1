"""The ``run_cohort`` flow against a real Prefect server, real MONAI bundles and synthetic CTs.

Studies are stored through the real ingest path; the flow runs in-process or
as a ``pacs-triage cohort run`` child process (SIGKILLed in the resume test);
the lane test runs clinical triage through the real outbox and the real
triage flow while a cohort runs in another process.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from archive.cohort_export import results_rows
from archive.cohorts import (
    CohortError,
    CohortItem,
    CohortSelectionError,
    StudyQuery,
    create_cohort,
    get_cohort,
    select_studies,
)
from archive.index import Instance, ModelResultRecord, Series, Study, StudyTriage, TriageJob
from archive.prefect_server import ManagedPrefectServer
from flows import runtime
from models.phantoms import write_head_ct
from models.registry import ModelRegistry
from models.testing import make_bundle
from pipeline.research import RESEARCH_SERIES_NUMBER
from tests.dicom_factory import ct_dataset
from tests.flows.cohort_support import Archive, cli

MODEL = "ich"
VERSION = "1.0"


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    models_dir = tmp_path / "models"
    make_bundle(models_dir, name=MODEL, version=VERSION, kind="intensity")
    archive = Archive.create(tmp_path / "data", models_dirs=[models_dir])
    yield archive
    runtime.configure(None)
    archive.db.dispose()


def use_runtime(archive: Archive) -> ModelRegistry:
    registry = ModelRegistry.discover(archive.settings.models_dirs)
    runtime.configure(
        runtime.TriageRuntime(
            settings=archive.settings,
            db=archive.db,
            file_store=archive.file_store,
            ingest=archive.ingest,
            registry=registry,
        )
    )
    return registry


def new_cohort(archive: Archive, name: str, registry: ModelRegistry, **kwargs: object):  # type: ignore[no-untyped-def]
    model = registry.get(MODEL, VERSION)
    return create_cohort(
        archive.db,
        name,
        model_name=MODEL,
        model_version=VERSION,
        weights_sha256=model.identity.weights_sha256,
        selection={"kind": "query"},
        studies=select_studies(archive.db, StudyQuery(modalities=("CT",))),
        **kwargs,  # type: ignore[arg-type]
    )


def add_corrupt_study(archive: Archive) -> str:
    """A CT study whose slices differ in size: not one volume (stored, but cannot be analysed)."""
    study_uid = pydicom.uid.generate_uid()
    series_uid = pydicom.uid.generate_uid()
    for number in range(1, 5):
        ds = ct_dataset(
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            instance_number=number,
            patient_id="BROKEN",
            study_date="20260102",
            rows=16 if number % 2 else 24,
            columns=16 if number % 2 else 24,
        )
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        assert archive.ingest.store(buffer.getvalue(), calling_ae_title="TEST").ok
    return study_uid


def count(archive: Archive, statement) -> int:  # type: ignore[no-untyped-def]
    with archive.db.reader() as session:
        return int(session.scalar(statement))


def run_flow(name: str, **kwargs: object) -> dict:
    from flows.cohort import run_cohort

    return run_cohort(name, **kwargs)  # type: ignore[arg-type]


class TestRunCohort:
    def test_failing_study_is_recorded_while_the_rest_complete(
        self, archive: Archive, prefect_api: str, tmp_path: Path
    ) -> None:
        good = [
            archive.add_phantom(tmp_path / "w", seed, positive=seed % 2 == 0) for seed in range(4)
        ]
        broken = add_corrupt_study(archive)
        registry = use_runtime(archive)
        new_cohort(archive, "c1", registry, write_sr=True)

        summary = run_flow("c1", concurrency=2)

        assert summary["status"] == "done"
        assert summary["counts"] == {"done": 4, "failed": 1}
        with archive.db.reader() as session:
            failed = session.execute(
                select(CohortItem.study_instance_uid, CohortItem.error).where(
                    CohortItem.status == "failed"
                )
            ).one()
        assert failed.study_instance_uid == broken
        assert "inconsistent geometry" in failed.error
        assert count(archive, select(func.count()).select_from(ModelResultRecord)) == 4
        # One research SR per analysed study, in its own series, marked as research.
        with archive.db.reader() as session:
            research = session.execute(
                select(Study.study_instance_uid, Series.series_description, Series.series_number)
                .join(Series, Series.study_pk == Study.id)
                .where(Series.modality == "SR")
            ).all()
        assert sorted(r.study_instance_uid for r in research) == sorted(good)
        assert all(r.series_description.startswith("RESEARCH c1") for r in research)
        assert all(r.series_number == RESEARCH_SERIES_NUMBER for r in research)
        # Storing the SRs did not make any study look incomplete (no triage job).
        assert count(archive, select(func.count()).select_from(TriageJob)) == 0
        rows = results_rows(archive.db, "c1")
        assert [r["status"] for r in rows].count("done") == 4
        failed_row = next(r for r in rows if r["status"] == "failed")
        assert failed_row["finding"] is None and "inconsistent geometry" in failed_row["error"]
        assert all(0.0 <= r["probability"] <= 1.0 for r in rows if r["status"] == "done")

    def test_done_studies_are_skipped_and_results_reused(
        self, archive: Archive, prefect_api: str, tmp_path: Path
    ) -> None:
        for seed in range(3):
            archive.add_phantom(tmp_path / "w", seed)
        registry = use_runtime(archive)
        new_cohort(archive, "first", registry, write_sr=False)
        assert run_flow("first")["counts"] == {"done": 3}

        again = run_flow("first")
        assert again["processed"] == 0 and again["counts"] == {"done": 3}

        new_cohort(archive, "second", registry, write_sr=False)
        second = run_flow("second")
        assert second["counts"] == {"done": 3}
        with archive.db.reader() as session:
            cached = session.scalars(
                select(CohortItem.cached)
                .where(CohortItem.cohort_id == get_cohort(archive.db, "second").id)
                .order_by(CohortItem.position)
            ).all()
        assert cached == [True, True, True]
        assert count(archive, select(func.count()).select_from(ModelResultRecord)) == 3
        assert count(archive, select(func.count()).where(Series.modality == "SR")) == 0

    def test_study_without_a_matching_series_is_skipped(
        self, archive: Archive, prefect_api: str, tmp_path: Path
    ) -> None:
        archive.add_phantom(tmp_path / "w", 1)
        make_bundle(
            archive.settings.models_dirs[0], name="mr-only", version="2", rule={"modality": ["MR"]}
        )
        registry = use_runtime(archive)
        model = registry.get("mr-only", "2")
        create_cohort(
            archive.db,
            "mr",
            model_name="mr-only",
            model_version="2",
            weights_sha256=model.identity.weights_sha256,
            selection={},
            studies=select_studies(archive.db, StudyQuery()),
        )
        assert run_flow("mr")["counts"] == {"skipped": 1}
        rows = results_rows(archive.db, "mr")
        assert rows[0]["status"] == "skipped"
        assert "no series matches the selection rule of model mr-only 2" in rows[0]["error"]

    def test_other_weights_than_at_creation_are_refused(
        self, archive: Archive, prefect_api: str, tmp_path: Path
    ) -> None:
        archive.add_phantom(tmp_path / "w", 1)
        use_runtime(archive)
        create_cohort(
            archive.db,
            "stale",
            model_name=MODEL,
            model_version=VERSION,
            weights_sha256="f" * 64,
            selection={},
            studies=select_studies(archive.db, StudyQuery()),
        )
        with pytest.raises(CohortError, match=r"has other weights .* than when the cohort was"):
            run_flow("stale")


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


class TestResume:
    def test_killed_run_resumes_with_no_study_twice_and_none_missed(
        self, archive: Archive, prefect_server: ManagedPrefectServer, tmp_path: Path
    ) -> None:
        studies = [archive.add_phantom(tmp_path / "w", seed, rows=48) for seed in range(16)]
        registry = ModelRegistry.discover(archive.settings.models_dirs)
        info = new_cohort(archive, "resume", registry, write_sr=True)
        env = archive.env(
            PREFECT_API_URL=prefect_server.api_url,
            PACS_TRIAGE_COHORT_STALE_RUN_SECONDS="1",
        )

        def done() -> int:
            return count(
                archive,
                select(func.count()).where(
                    CohortItem.cohort_id == info.id, CohortItem.status == "done"
                ),
            )

        first = subprocess.Popen(
            cli("cohort", "run", "resume", "--quiet"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            assert wait_until(lambda: done() >= 3, 120, 0.02), first.stdout.read().decode()  # type: ignore[union-attr]
            os.killpg(first.pid, signal.SIGKILL)
        finally:
            first.wait()
        killed_at = done()
        assert killed_at < len(studies), "the run finished before it could be killed"

        time.sleep(1.2)  # the dead run's heartbeat goes stale
        second = subprocess.run(
            cli("cohort", "run", "resume", "--quiet"),
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 0, second.stdout + second.stderr
        summary = json.loads(second.stdout.strip().splitlines()[-1])
        assert summary["counts"] == {"done": len(studies)}
        assert summary["processed"] == len(studies) - killed_at

        with archive.db.reader() as session:
            attempts = session.execute(
                select(CohortItem.study_instance_uid, CohortItem.attempts).where(
                    CohortItem.cohort_id == info.id
                )
            ).all()
            results = session.execute(
                select(ModelResultRecord.study_pk, func.count()).group_by(
                    ModelResultRecord.study_pk
                )
            ).all()
            reports = session.scalar(
                select(func.count())
                .select_from(Instance)
                .join(Series)
                .where(Series.modality == "SR")
            )
        # None missed, none processed twice: one result and one research SR per study;
        # only the studies in flight when the run died were claimed a second time.
        assert sorted(uid for uid, _ in attempts) == sorted(studies)
        assert len(results) == len(studies) and all(n == 1 for _, n in results)
        assert reports == len(studies)
        assert sum(1 for _, n in attempts if n > 1) <= 1  # concurrency 1


class TestRemoteCohort:
    def test_cohort_pulled_from_orthanc(
        self, archive: Archive, tmp_path: Path, dcmtk: None
    ) -> None:
        from archive.config import RemoteAE
        from archive.remote import move_studies, pull_studies
        from tests.peers import NodeProcess, OrthancPeer, storescu

        dates = {"old": "20240101", "mid": "20250601", "new": "20260101"}
        files = {
            key: write_head_ct(
                tmp_path / "remote" / key,
                positive=False,
                seed=100 + n,
                patient_id=f"REMOTE{n}",
                study_date=date,
                slices=6,
                rows=32,
            )
            for n, (key, date) in enumerate(dates.items())
        }
        node = NodeProcess(
            archive.settings.data_dir,
            env={
                "PACS_TRIAGE_DATABASE_URL": archive.settings.resolved_database_url,
                "PACS_TRIAGE_TRIAGE_ENABLED": "false",
                "PACS_TRIAGE_DICOM_WORKERS": "1",
                "PACS_TRIAGE_FSYNC": "false",
            },
        )
        with node:
            orthanc = OrthancPeer(
                modalities={"pacs": ("PACS_TRIAGE", "127.0.0.1", node.dicom_port)}
            )
            with orthanc:
                for paths in files.values():
                    sent = storescu(orthanc.dicom_port, paths, called="ORTHANC")
                    assert sent.returncode == 0, sent.stderr
                remote = RemoteAE(ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)

                selected, outcomes = pull_studies(
                    archive.db,
                    remote,
                    StudyQuery(modalities=("CT",), study_date_from="20250101"),
                    calling_ae_title="PACS_TRIAGE",
                    destination_ae_title="PACS_TRIAGE",
                    interval_seconds=0.1,
                )
                # A remote that does not know the destination: a failure status per study
                # (Orthanc answers C000), and pull_studies says what to check.
                refused = move_studies(
                    remote,
                    [selected[0].study_instance_uid],
                    calling_ae_title="PACS_TRIAGE",
                    destination_ae_title="NOBODY",
                )
                assert not refused[0].ok and refused[0].completed == 0
                with pytest.raises(CohortSelectionError, match="none arrived here"):
                    pull_studies(
                        archive.db,
                        remote,
                        StudyQuery(study_date_from="20250101"),
                        calling_ae_title="PACS_TRIAGE",
                        destination_ae_title="NOBODY",
                    )

        expected = {
            str(pydicom.dcmread(files[k][0], stop_before_pixels=True).StudyInstanceUID)
            for k in ("mid", "new")
        }
        assert {s.study_instance_uid for s in selected} == expected
        assert all(o.ok and o.completed == 6 for o in outcomes)
        with archive.db.reader() as session:
            stored = dict(
                session.execute(
                    select(Study.study_instance_uid, func.count(Instance.id))
                    .join(Series, Series.study_pk == Study.id)
                    .join(Instance, Instance.series_pk == Series.id)
                    .group_by(Study.study_instance_uid)
                ).all()
            )
        assert stored == dict.fromkeys(expected, 6)  # the old study was not pulled
        registry = ModelRegistry.discover(archive.settings.models_dirs)
        info = create_cohort(
            archive.db,
            "remote",
            model_name=MODEL,
            model_version=VERSION,
            weights_sha256=registry.get(MODEL, VERSION).identity.weights_sha256,
            selection={"kind": "remote", "remote": "ORTHANC"},
            studies=selected,
        )
        assert info.total == 2


class TestLane:
    def test_clinical_study_is_triaged_in_time_while_a_cohort_runs(
        self, archive: Archive, prefect_server: ManagedPrefectServer, tmp_path: Path
    ) -> None:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from archive.dispatch import Dispatcher
        from archive.triage import mark_ready, stable_candidates
        from flows.triage import triage_study

        for seed in range(30):
            archive.add_phantom(tmp_path / "w", seed)
        registry = use_runtime(archive)  # clinical triage runs in this process
        info = new_cohort(archive, "lane", registry, write_sr=True)
        api_url = prefect_server.api_url

        def run_triage(job) -> None:  # type: ignore[no-untyped-def]
            with temporary_settings(updates={PREFECT_API_URL: api_url}):
                asyncio.run(triage_study(job.id))

        dispatcher = Dispatcher(archive.settings, archive.db, run_triage, poll_seconds=0.2)
        dispatcher.start()
        cohort_run = subprocess.Popen(
            cli("cohort", "run", "lane", "--quiet"),
            env=archive.env(PREFECT_API_URL=api_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:

            def cohort_done() -> int:
                return count(
                    archive,
                    select(func.count()).where(
                        CohortItem.cohort_id == info.id, CohortItem.status == "done"
                    ),
                )

            assert wait_until(lambda: cohort_done() >= 5, 120), "the cohort did not start"
            clinical = archive.add_phantom(tmp_path / "w", 999, positive=True)
            candidate = next(
                c
                for c in stable_candidates(archive.db, since=None)
                if c.study_instance_uid == clinical
            )
            ready = time.monotonic()
            assert mark_ready(archive.db, candidate) == 1
            dispatcher.wake()

            def triaged() -> str | None:
                with archive.db.reader() as session:
                    return session.scalar(
                        select(StudyTriage.state)
                        .join(Study, Study.id == StudyTriage.study_pk)
                        .where(
                            Study.study_instance_uid == clinical,
                            StudyTriage.state.in_(["triaged", "failed", "no_applicable_model"]),
                        )
                    )

            assert wait_until(lambda: triaged() is not None, 120, 0.05)
            time_to_triage = time.monotonic() - ready
            done_when_triaged = cohort_done()
            output, _ = cohort_run.communicate(timeout=300)
        finally:
            dispatcher.stop()
            if cohort_run.poll() is None:
                cohort_run.kill()
                cohort_run.wait()

        assert triaged() == "triaged"
        summary = json.loads(output.strip().splitlines()[-1])
        assert summary["counts"] == {"done": 30}, output
        # The clinical study's time budget on this 2-core machine is well under a minute.
        assert time_to_triage < 60, f"clinical study took {time_to_triage:.1f} s"
        # Clinical first: no cohort study started while the triage job was queued or
        # running (except one claimed in the same instant the job appeared).
        with archive.db.reader() as session:
            job = session.execute(select(TriageJob)).scalar_one()
            overlapping = session.scalar(
                select(func.count()).where(
                    CohortItem.cohort_id == info.id,
                    CohortItem.started_at > job.created_at,
                    CohortItem.started_at < job.finished_at,
                )
            )
        assert overlapping <= 1
        print(
            f"clinical time-to-triage {time_to_triage:.2f} s with the cohort at "
            f"{done_when_triaged}/30; cohort yielded {summary['yield_seconds']:.2f} s"
        )


class TestDistributed:
    def test_submitted_run_waits_on_the_cohort_queue_behind_triage(
        self, archive: Archive, prefect_api: str
    ) -> None:
        from prefect import get_client

        from archive.cohort_runner import submit

        settings = archive.settings.model_copy(update={"prefect_work_pool": "cohort-test-pool"})
        run_id = submit(settings, "some-cohort", concurrency=2)

        async def read() -> tuple[object, dict[str, int]]:
            async with get_client() as client:
                run = await client.read_flow_run(run_id)
                queues = await client.read_work_queues(work_pool_name="cohort-test-pool")
                return run, {q.name: q.priority for q in queues}

        run, priorities = asyncio.run(read())
        assert run.work_queue_name == "cohort"  # type: ignore[attr-defined]
        assert run.parameters["cohort_name"] == "some-cohort"  # type: ignore[attr-defined]
        assert run.state.is_scheduled()  # type: ignore[attr-defined]
        assert priorities["triage"] < priorities["cohort"]
