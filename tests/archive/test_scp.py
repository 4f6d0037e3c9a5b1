"""The node over the network: real senders (storescu, pynetdicom) against ``pacs-triage serve``.

Each node runs as its own process group (acceptor + DIMSE workers), on SQLite
or on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from sqlalchemy import func, select

from archive import status
from archive.db import Database
from archive.index import Instance, Series, Study, StudyTriage, TriageJob
from tests.dicom_factory import ct_dataset, dataset_bytes, part10_bytes, write
from tests.peers import STORESCU_PROPOSE, NodeProcess, echoscu, storescu

pytestmark = pytest.mark.network


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeProcess]:
    """A running node with an empty archive, once per index backend."""
    request.getfixturevalue("dcmtk")
    data_dir = tmp_path_factory.mktemp("node") / "data"
    env: dict[str, str] = {}
    pg_url = None
    if request.param == "postgresql":
        postgres = request.getfixturevalue("postgres")
        pg_url = postgres.create()
        env["PACS_TRIAGE_DATABASE_URL"] = pg_url
    node = NodeProcess(data_dir, env=env)
    node.database_url = pg_url or f"sqlite:///{data_dir / 'index.sqlite'}"  # type: ignore[attr-defined]
    with node:
        yield node
    if pg_url:
        request.getfixturevalue("postgres").drop(pg_url)


@pytest.fixture
def fresh_node(tmp_path: Path, dcmtk: None) -> Iterator[NodeProcess]:
    """A node of its own (SQLite), for tests that need an archive nobody else wrote to."""
    node = NodeProcess(tmp_path / "data")
    node.database_url = f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}"  # type: ignore[attr-defined]
    with node:
        yield node


def node_db(node: NodeProcess) -> Database:
    return Database(node.database_url)  # type: ignore[attr-defined]


def stored_path(node: NodeProcess, sop_instance_uid: str) -> Path:
    db = node_db(node)
    try:
        with db.reader() as session:
            rel = session.scalars(
                select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid)
            ).one()
    finally:
        db.dispose()
    return node.data_dir / "files" / rel


def assert_same_elements(original: pydicom.Dataset, stored: pydicom.Dataset) -> None:
    """Every element of `original` is in `stored` with the same value (pixels bitwise)."""
    for element in original:
        if element.VR == "UN" or element.tag.is_private:
            continue  # a sender may re-type private elements when it re-encodes
        assert element.tag in stored, element.keyword
        assert stored[element.tag].value == element.value, element.keyword


class TestStoreWithStorescu:
    def test_ct_series_stored_with_matching_index_rows(
        self, node: NodeProcess, ct_series_files: list[Path]
    ) -> None:
        result = storescu(node.dicom_port, ct_series_files, calling="CT1", extra=["-xi"])
        assert result.returncode == 0, result.stderr

        db = node_db(node)
        try:
            for path in ct_series_files:
                ds = pydicom.dcmread(path)
                with db.reader() as session:
                    instance = session.scalars(
                        select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)
                    ).one()
                    assert instance.calling_ae_title == "CT1"
                    assert instance.instance_number == ds.InstanceNumber
                    assert instance.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
                    assert instance.series.series_instance_uid == ds.SeriesInstanceUID
                    assert instance.series.modality == ds.Modality
                    assert instance.series.study.study_instance_uid == ds.StudyInstanceUID
                    assert instance.series.study.patient.patient_id == ds.PatientID
                stored = (node.data_dir / "files" / instance.path).read_bytes()
                assert hashlib.sha256(stored).hexdigest() == instance.sha256
                assert_same_elements(ds, pydicom.dcmread(io.BytesIO(stored)))
            with db.reader() as session:
                study = session.scalars(
                    select(Study).where(
                        Study.study_instance_uid
                        == pydicom.dcmread(ct_series_files[0]).StudyInstanceUID
                    )
                ).one()
                assert study.number_of_study_related_instances == len(ct_series_files)
                assert study.modalities_in_study == "CT"
        finally:
            db.dispose()

    def test_sender_converting_transfer_syntax_stores_what_it_sent(
        self, node: NodeProcess, ct_series_files: list[Path]
    ) -> None:
        # Default storescu proposals: the Implicit VR files go out as Explicit VR.
        # The archive keeps the Explicit VR data set it received.
        source = ct_series_files[0]
        result = storescu(node.dicom_port, [source])
        assert result.returncode == 0, result.stderr
        original = pydicom.dcmread(source)
        stored = pydicom.dcmread(stored_path(node, original.SOPInstanceUID))
        assert stored.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
        assert_same_elements(original, stored)

    def test_every_transfer_syntax_stored_as_sent(
        self, node: NodeProcess, transfer_syntax_files: list[Path]
    ) -> None:
        for path in transfer_syntax_files:
            ds = pydicom.dcmread(path)
            option = STORESCU_PROPOSE.get(ds.file_meta.TransferSyntaxUID, "-xe")
            result = storescu(node.dicom_port, [path], extra=[option])
            assert result.returncode == 0, f"{path.name}: {result.stderr}"
            stored = pydicom.dcmread(stored_path(node, ds.SOPInstanceUID))
            assert stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
            assert_same_elements(ds, stored)

    def test_echo_answers(self, node: NodeProcess) -> None:
        assert echoscu(node.dicom_port) == 0


class TestStoreRawBytes:
    """pynetdicom in chunked mode puts a file's data set on the wire unparsed: exactly
    those bytes must be what the archive stores."""

    def test_raw_data_sets_stored_byte_identical(
        self,
        fresh_node: NodeProcess,
        ct_series_files: list[Path],
        transfer_syntax_files: list[Path],
    ) -> None:
        files = ct_series_files[:20] + transfer_syntax_files
        ae = AE(ae_title="RAWSCU")
        for path in files:
            meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
            ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", fresh_node.dicom_port)
        assert assoc.is_established
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            for path in files:
                assert assoc.send_c_store(path).Status == status.SUCCESS, path.name
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
            assoc.release()
        for path in files:
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            stored = stored_path(fresh_node, uid).read_bytes()
            assert dataset_bytes(stored) == dataset_bytes(path.read_bytes()), path.name


def _send_with_pynetdicom(port: int, paths: list[str]) -> list[int]:
    """Send files over one association from this process; return the statuses."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in paths]
    assoc.release()
    return statuses


class TestStoreWithPynetdicom:
    def test_bad_instances_get_specific_failures_and_association_stays_usable(
        self, node: NodeProcess, tmp_path: Path
    ) -> None:
        good = ct_dataset()
        bad_uid = ct_dataset()
        bad_uid.StudyInstanceUID = "1.2.abc"
        # A data set without SOP Instance UID, announced by its file meta.
        no_uid = ct_dataset()
        del no_uid.SOPInstanceUID
        no_uid_path = write(no_uid, tmp_path / "no-uid.dcm", keep_meta=True)
        # A data set whose SOP Instance UID differs from the one in the command.
        mismatch = ct_dataset()
        mismatch.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        mismatch_path = write(mismatch, tmp_path / "mismatch.dcm", keep_meta=True)
        # A data set cut short in the middle of its pixel data.
        truncated_path = tmp_path / "truncated.dcm"
        truncated_path.write_bytes(part10_bytes(ct_dataset(rows=64, columns=64))[:-3000])

        ae = AE(ae_title="PYSCU")
        # One transfer syntax, that of the files: chunked sending needs an exact match.
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.dicom_port)
        assert assoc.is_established
        try:
            rsp = assoc.send_c_store(bad_uid)
            assert rsp.Status == status.CANNOT_UNDERSTAND_INVALID_UID
            assert rsp.ErrorComment == "StudyInstanceUID not a valid UID"
            # Raw bytes go out unparsed in chunked mode: how a broken sender looks.
            _config.STORE_SEND_CHUNKED_DATASET = True
            try:
                rsp = assoc.send_c_store(no_uid_path)
                assert rsp.Status == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
                assert rsp.ErrorComment == "SOPInstanceUID missing"
                rsp = assoc.send_c_store(mismatch_path)
                assert rsp.Status == status.CANNOT_UNDERSTAND_UID_MISMATCH
                assert rsp.ErrorComment == "SOPInstanceUID differs from command"
                rsp = assoc.send_c_store(truncated_path)
                assert rsp.Status == status.CANNOT_UNDERSTAND
                assert rsp.ErrorComment == "data set truncated"
            finally:
                _config.STORE_SEND_CHUNKED_DATASET = False
            rsp = assoc.send_c_store(good)
            assert rsp.Status == status.SUCCESS
        finally:
            assoc.release()
        stored = [p.name for p in (node.data_dir / "files").rglob("*.dcm")]
        assert f"{good.SOPInstanceUID}.dcm" in stored
        for ds in (bad_uid, mismatch):
            assert f"{ds.SOPInstanceUID}.dcm" not in stored
        assert list((node.data_dir / "tmp").iterdir()) == []

    def test_duplicate_with_other_content_answers_warning(self, node: NodeProcess) -> None:
        first = ct_dataset(seed=1)
        second = ct_dataset(
            sop_instance_uid=first.SOPInstanceUID,
            study_instance_uid=first.StudyInstanceUID,
            series_instance_uid=first.SeriesInstanceUID,
            seed=2,
        )
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.dicom_port)
        try:
            assert assoc.send_c_store(first).Status == status.SUCCESS
            assert assoc.send_c_store(first).Status == status.SUCCESS
            rsp = assoc.send_c_store(second)
            assert rsp.Status == status.WARNING_ELEMENTS_DISCARDED
            assert "first kept" in rsp.ErrorComment
        finally:
            assoc.release()
        stored = pydicom.dcmread(stored_path(node, first.SOPInstanceUID))
        assert stored.PixelData == first.PixelData

    def test_concurrent_associations_from_several_processes_all_stored(
        self, node: NodeProcess, tmp_path: Path
    ) -> None:
        study_uid = generate_uid()
        series_uids = [generate_uid() for _ in range(4)]
        groups: list[list[str]] = [[] for _ in range(4)]
        for i in range(40):
            ds = ct_dataset(
                study_instance_uid=study_uid,
                series_instance_uid=series_uids[i % 4],
                instance_number=i + 1,
                seed=i,
            )
            groups[i % 4].append(str(write(ds, tmp_path / f"{i}.dcm")))
        # Processes, not threads: pynetdicom SCUs in threads of one process mix up responses.
        with multiprocessing.get_context("spawn").Pool(4) as pool:
            results = pool.starmap(_send_with_pynetdicom, [(node.dicom_port, g) for g in groups])
        assert [s for group in results for s in group] == [status.SUCCESS] * 40
        db = node_db(node)
        try:
            with db.reader() as session:
                study = session.scalars(
                    select(Study).where(Study.study_instance_uid == study_uid)
                ).one()
                assert study.number_of_study_related_instances == 40
                assert study.number_of_study_related_series == 4
                assert (
                    session.scalar(
                        select(func.count()).select_from(Series).where(Series.study_pk == study.id)
                    )
                    == 4
                )
        finally:
            db.dispose()


class TestCallerAllowList:
    @pytest.fixture(scope="class")
    def closed_node(self, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
        env = {
            "PACS_TRIAGE_OPEN_ON_LOOPBACK": "false",
            "PACS_TRIAGE_ALLOWED_CALLERS": json.dumps(
                [
                    {"ae_title": "CT1"},
                    {"ae_title": "ECHOSCU"},
                    {"ae_title": "MR1", "hosts": ["10.9.0.0/16"]},
                ]
            ),
        }
        with NodeProcess(tmp_path_factory.mktemp("closed") / "data", env=env) as node:
            yield node

    def test_unknown_calling_ae_is_rejected_with_reason(self, closed_node: NodeProcess) -> None:
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", closed_node.dicom_port)
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        # PS3.8 9.3.4: rejected-permanent, by the service user, calling AE not recognized.
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
        assert "INTRUDER" in closed_node.log()

    def test_listed_calling_ae_is_accepted(self, closed_node: NodeProcess) -> None:
        ae = AE(ae_title="CT1")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", closed_node.dicom_port)
        assert assoc.is_established
        assert assoc.send_c_store(ct_dataset()).Status == status.SUCCESS
        assoc.release()

    def test_listed_ae_from_other_network_is_rejected(self, closed_node: NodeProcess) -> None:
        ae = AE(ae_title="MR1")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", closed_node.dicom_port)
        assert assoc.is_rejected

    def test_dcmtk_sender_sees_the_rejection(self, closed_node: NodeProcess) -> None:
        result = subprocess.run(
            ["echoscu", "-aet", "NOBODY", "127.0.0.1", str(closed_node.dicom_port)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode != 0
        assert "Calling AE Title Not Recognized" in result.stderr


class TestCrash:
    def test_kill_mid_stream_loses_no_acknowledged_instance(
        self, tmp_path: Path, ct_series_files: list[Path]
    ) -> None:
        node = NodeProcess(tmp_path / "data").start()
        sender = subprocess.Popen(
            ["storescu", "-v", "-aec", "ANY", "-xi", "127.0.0.1", str(node.dicom_port)]
            + [str(p) for p in ct_series_files],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        db = Database(f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with db.reader() as session:
                if session.scalar(select(func.count()).select_from(Instance)) >= 30:
                    break
            time.sleep(0.01)
        node.kill()
        output, _ = sender.communicate(timeout=60)
        db.dispose()

        acknowledged = []
        current = None
        for line in output.splitlines():
            if match := re.search(r"Sending file: (\S+)", line):
                current = match.group(1)
            elif "Received Store Response (Success)" in line and current:
                acknowledged.append(current)
        # Rows may be committed whose Success the kill cut off; none the other way round.
        assert 20 <= len(acknowledged) < len(ct_series_files), output[-2000:]

        node.start()  # restart on the same data directory
        try:
            db = Database(f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
            with db.reader() as session:
                rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
            db.dispose()
            for path in acknowledged:
                uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
                assert uid in rows, f"acknowledged {path} missing after restart"
            for row in rows.values():
                data = (tmp_path / "data" / "files" / row.path).read_bytes()
                assert hashlib.sha256(data).hexdigest() == row.sha256
            indexed = {row.path for row in rows.values()}
            on_disk = {
                str(p.relative_to(tmp_path / "data" / "files"))
                for p in (tmp_path / "data" / "files").rglob("*.dcm")
            }
            # A file renamed into place just before the kill may lack its row (the
            # sender got no Success and will resend); the reverse never happens.
            assert indexed <= on_disk
            assert len(on_disk - indexed) <= 2 * os.cpu_count()
            assert list((tmp_path / "data" / "tmp").iterdir()) == []
        finally:
            node.stop()


class TestStudyCompleteness:
    def test_release_of_the_association_makes_the_study_ready_before_the_quiet_period(
        self, tmp_path: Path, ct_series_files: list[Path], dcmtk: None
    ) -> None:
        env = {
            "PACS_TRIAGE_STABLE_AFTER_SECONDS": "120",
            "PACS_TRIAGE_STABLE_AFTER_RELEASE_SECONDS": "0.5",
        }
        with NodeProcess(tmp_path / "data", env=env) as node:
            result = storescu(node.dicom_port, ct_series_files[:5])
            assert result.returncode == 0, result.stderr
            released = time.monotonic()
            db = Database(f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
            try:
                state = None
                while time.monotonic() - released < 30 and state is None:
                    with db.reader() as session:
                        state = session.scalars(select(StudyTriage.state)).one_or_none()
                    time.sleep(0.1)
                waited = time.monotonic() - released
                with db.reader() as session:
                    jobs = session.scalars(select(TriageJob.generation)).all()
            finally:
                db.dispose()
        assert state == "queued"
        assert jobs == [1]
        assert waited < 10, f"ready after {waited:.1f} s, not shortened by the release"
