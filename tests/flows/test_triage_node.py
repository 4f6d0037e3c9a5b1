"""Triage end to end: dcmtk storescu into a running ``pacs-triage serve``, SR back in the study.

Embedded mode (the node's own managed Prefect server, flows in-process),
a crash (SIGKILL) between "ready" and "triaged", and distributed mode (a
real ``prefect server``, the node submitting to a work pool, ``pacs-triage
worker`` running the flow).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import func, select

from archive.db import Database
from archive.index import Instance, ModelResultRecord, Series, Study, TriageJob
from archive.prefect_server import ManagedPrefectServer
from archive.store import FileStore
from models.phantoms import write_head_ct
from models.testing import make_bundle
from pipeline import codes as triage_codes
from tests.peers import REPO_ROOT, NodeProcess, storescu

pytestmark = pytest.mark.network

TRIAGE_TIMEOUT = 180.0
READ_TOKEN = "triage-test-read-token-0123456789"
FINAL = ("triaged", "no_applicable_model", "failed")


def node_env(models_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        "PACS_TRIAGE_MODELS_DIRS": json.dumps([str(models_dir)]),
        "PACS_TRIAGE_STABLE_AFTER_SECONDS": "3",
        "PACS_TRIAGE_STABLE_AFTER_RELEASE_SECONDS": "0.5",
        "PACS_TRIAGE_DICOM_WORKERS": "1",
        "PACS_TRIAGE_FSYNC": "false",
        "PACS_TRIAGE_NODE_NAME": "test-node",
        "PACS_TRIAGE_HTTP_TOKENS": json.dumps(
            [{"name": "test", "token": READ_TOKEN, "scopes": ["read"]}]
        ),
        **extra,
    }
    return env


def seed_prefect_home(node: NodeProcess, server: ManagedPrefectServer) -> None:
    """Give the node's managed Prefect server an already migrated database.

    A fresh Prefect database runs every migration at server start (about 7 s
    here); the tests of embedded mode copy the session server's instead. The
    server is still the node's own child, started by the node.
    """
    home = node.data_dir / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    source = sqlite3.connect(server.home / "prefect.db")
    target = sqlite3.connect(home / "prefect.db")
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


def embedded_env() -> dict[str, str]:
    """The test process's environment without a Prefect API: the node runs embedded."""
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}


def triage_state(node: NodeProcess, study_instance_uid: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{node.http_url}/api/studies/{study_instance_uid}/triage",
        headers={"Authorization": f"Bearer {READ_TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def wait_for(condition: Callable[[], Any], what: str, node: NodeProcess, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; node log:\n{node.log()[-6000:]}")


def wait_final(node: NodeProcess, study_instance_uid: str) -> dict[str, Any]:
    return wait_for(
        lambda: (s := triage_state(node, study_instance_uid))["state"] in FINAL and s,
        f"a final triage state of {study_instance_uid}",
        node,
        TRIAGE_TIMEOUT,
    )


def sr_files(node: NodeProcess, study_instance_uid: str) -> list[Path]:
    db = Database(f"sqlite:///{node.data_dir / 'index.sqlite'}")
    try:
        with db.reader() as session:
            paths = session.scalars(
                select(Instance.path)
                .join(Series)
                .join(Study)
                .where(Study.study_instance_uid == study_instance_uid, Series.modality == "SR")
            ).all()
    finally:
        db.dispose()
    store = FileStore(node.data_dir, fsync=False)
    return [store.absolute(p) for p in paths]


def send(node: NodeProcess, files: list[Path]) -> None:
    result = storescu(node.dicom_port, files, called="PACS_TRIAGE", calling="CT_ROOM1")
    assert result.returncode == 0, result.stderr


def sr_series_by_c_find(node: NodeProcess, study_instance_uid: str, workdir: Path) -> list[str]:
    """SR series of the study, as dcmtk's findscu sees them (Study Root, SERIES level)."""
    workdir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            *("findscu", "-S", "-aet", "FINDSCU", "-aec", "PACS_TRIAGE", "-X", "-od", str(workdir)),
            *("-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study_instance_uid}"),
            *("-k", "Modality=SR", "-k", "SeriesInstanceUID"),
            *("127.0.0.1", str(node.dicom_port)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [str(pydicom.dcmread(p).SeriesInstanceUID) for p in sorted(workdir.glob("rsp*.dcm"))]


def sr_series_by_qido(node: NodeProcess, study_instance_uid: str) -> list[str]:
    """SR series of the study, as QIDO-RS answers (PS3.18 10.6)."""
    request = urllib.request.Request(
        f"{node.http_url}/dicom-web/studies/{study_instance_uid}/series?Modality=SR",
        headers={"Authorization": f"Bearer {READ_TOKEN}", "Accept": "application/dicom+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return [item["0020000E"]["Value"][0] for item in json.load(response)]


def check_sr_conforms(path: Path, study_instance_uid: str) -> hd.sr.Comprehensive3DSR:
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    assert sr.StudyInstanceUID == study_instance_uid
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    dciodvfy = shutil.which("dciodvfy")
    assert dciodvfy, "dciodvfy (Debian dicom3tools) is required"
    checked = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
    errors = [line for line in checked.stderr.splitlines() if line.startswith("Error")]
    assert checked.returncode == 0 and errors == [], checked.stderr
    return sr


@pytest.fixture(scope="module")
def head_phantom(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_head_ct(
        tmp_path_factory.mktemp("phantom"), positive=True, seed=7, patient_id="PH-7", slices=32
    )


class TestEmbeddedNode:
    def test_head_ct_is_triaged_stat_by_shipped_model_and_abdominal_ct_has_no_applicable_model(
        self,
        dcmtk: None,
        prefect_server: ManagedPrefectServer,
        tmp_path: Path,
        head_phantom: list[Path],
        ct_series_files: list[Path],
    ) -> None:
        # Only the shipped models (models/bundles): ich_ct_demo applies to head CT.
        node = NodeProcess(
            tmp_path / "node",
            env={**embedded_env(), **node_env(tmp_path / "no-extra-models")},
            triage=True,
        )
        seed_prefect_home(node, prefect_server)
        with node:
            send(node, head_phantom)
            send(node, ct_series_files)
            head_uid = str(pydicom.dcmread(head_phantom[0]).StudyInstanceUID)
            ct_uid = str(pydicom.dcmread(ct_series_files[0]).StudyInstanceUID)

            head = wait_final(node, head_uid)
            ct = wait_final(node, ct_uid)

            assert head["state"] == "triaged", head
            assert head["priority_class"] == "STAT"
            [result] = head["model_results"]
            assert (result["model_name"], result["mode"]) == ("ich_ct_demo", "active")
            assert result["findings"][0]["present"] is True
            [sr_path] = sr_files(node, head_uid)
            sr = check_sr_conforms(sr_path, head_uid)
            assert sr.SOPInstanceUID == head["sr_sop_instance_uid"]
            assert sr_series_by_c_find(node, head_uid, tmp_path / "find") == [sr.SeriesInstanceUID]
            assert sr_series_by_qido(node, head_uid) == [sr.SeriesInstanceUID]
            [probability] = hd.sr.utils.find_content_items(
                sr, name=triage_codes.AI_FINDING_PROBABILITY, recursive=True
            )
            assert float(probability.MeasuredValueSequence[0].NumericValue) == pytest.approx(
                result["findings"][0]["probability"], abs=1e-3
            )
            [algorithm] = hd.sr.utils.find_content_items(
                sr, name=pydicom.sr.codedict.codes.DCM.AlgorithmName, recursive=True
            )
            assert algorithm.TextValue == "ich_ct_demo"

            assert ct["state"] == "no_applicable_model", ct
            assert ct["failure_reason"] is None and ct["model_results"] == []
            [ct_sr] = sr_files(node, ct_uid)
            check_sr_conforms(ct_sr, ct_uid)
        assert "PatientName" not in node.log() and "Phantom^Head" not in node.log()


class TestCrashRecovery:
    def test_node_killed_between_ready_and_triaged_triages_the_study_once(
        self,
        dcmtk: None,
        prefect_server: ManagedPrefectServer,
        tmp_path: Path,
        ct_series_files: list[Path],
    ) -> None:
        models_dir = tmp_path / "models"
        make_bundle(models_dir, name="ct-test", version="1.0.0", probability=0.7)
        node = NodeProcess(
            tmp_path / "node", env={**embedded_env(), **node_env(models_dir)}, triage=True
        )
        seed_prefect_home(node, prefect_server)
        ct_uid = str(pydicom.dcmread(ct_series_files[0]).StudyInstanceUID)
        index = Database(f"sqlite:///{node.data_dir / 'index.sqlite'}")

        def job_running() -> bool:
            with index.reader() as session:
                return "running" in session.scalars(select(TriageJob.status)).all()

        try:
            node.start()
            send(node, ct_series_files)
            wait_for(job_running, "the triage job to be claimed", node, TRIAGE_TIMEOUT)
            assert triage_state(node, ct_uid)["state"] in ("queued", "analysing")
            node.kill()

            node.start()
            state = wait_final(node, ct_uid)
            assert state["state"] == "triaged", state
            assert state["generation"] == 1
            [sr_path] = sr_files(node, ct_uid)
            check_sr_conforms(sr_path, ct_uid)
            with index.reader() as session:
                jobs = session.execute(select(TriageJob.status, TriageJob.attempts)).all()
                results = session.scalar(select(func.count()).select_from(ModelResultRecord))
            assert [tuple(j) for j in jobs] == [("done", 2)]
            assert results == 1
            patient_name = str(pydicom.dcmread(ct_series_files[0]).PatientName)
            assert patient_name not in node.log()
        finally:
            node.stop()
            index.dispose()


@pytest.fixture
def work_pool() -> str:
    return f"pacs-triage-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def worker_process(
    tmp_path: Path, prefect_server: ManagedPrefectServer, work_pool: str
) -> Iterator[Callable[[NodeProcess], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(node: NodeProcess) -> subprocess.Popen[bytes]:
        log = (tmp_path / "worker.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "archive.cli", "worker", "--limit", "1"],
            env={**node.env, "PREFECT_HOME": str(tmp_path / "worker-prefect")},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO_ROOT),
            start_new_session=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, 15)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()


class TestDistributedNode:
    def test_node_submits_to_triage_queue_and_a_worker_triages(
        self,
        dcmtk: None,
        tmp_path: Path,
        prefect_server: ManagedPrefectServer,
        prefect_api: str,
        head_phantom: list[Path],
        work_pool: str,
        worker_process: Callable[[NodeProcess], subprocess.Popen[bytes]],
    ) -> None:
        env = {
            **embedded_env(),
            **node_env(tmp_path / "no-extra-models"),
            "PREFECT_API_URL": prefect_server.api_url,
            "PACS_TRIAGE_PREFECT_WORK_POOL": work_pool,
            "PREFECT_HOME": str(tmp_path / "node-prefect"),
        }
        node = NodeProcess(tmp_path / "node", env=env, triage=True)
        with node:
            worker = worker_process(node)
            send(node, head_phantom)
            head_uid = str(pydicom.dcmread(head_phantom[0]).StudyInstanceUID)
            state = wait_final(node, head_uid)
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            assert state["state"] == "triaged", (state, (tmp_path / "worker.log").read_text())
            assert state["priority_class"] == "STAT"
            [sr_path] = sr_files(node, head_uid)
            check_sr_conforms(sr_path, head_uid)

        runs, queues = asyncio.run(_pool_state(work_pool))
        assert (queues["triage"], queues["cohort"]) == (1, 10)
        assert [(r.work_queue_name, r.state_type.value) for r in runs] == [("triage", "COMPLETED")]


async def _pool_state(work_pool: str) -> tuple[list[Any], dict[str, int]]:
    """The flow runs of the work pool and its queues' priorities, from the Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

    async with get_client() as client:
        queues = await client.read_work_queues(work_pool_name=work_pool)
        runs = await client.read_flow_runs(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[work_pool]))
        )
    return runs, {q.name: q.priority for q in queues}
