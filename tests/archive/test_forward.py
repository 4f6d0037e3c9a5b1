"""Forwarding AI results: C-STORE into a real Orthanc (the hospital PACS), STOW-RS to a server.

Orthanc (Debian package) plays the hospital PACS; the STOW-RS receiver is a
real HTTP server in the test that parses the multipart/related body (PS3.18
10.5) and reads each part with pydicom.
"""

from __future__ import annotations

import io
import json
import threading
from datetime import timedelta
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from archive.config import DicomwebDestination, ForwardDestination, HttpToken, Settings
from archive.db import Database
from archive.http import AppContext, HttpService, TokenBook, create_app
from archive.index import DeliveryOutbox, Instance, Series, Study, utcnow
from archive.ingest import Ingest
from archive.outbox import deliver_due
from archive.store import FileStore
from tests.peers import OrthancPeer, free_port
from tests.worklist_support import SLICES, triaged_study

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage

pytestmark = pytest.mark.network


def rows(db: Database) -> dict[str, DeliveryOutbox]:
    with db.reader() as session:
        return {r.channel: r for r in session.scalars(select(DeliveryOutbox))}


def orthanc_sop_classes(orthanc: OrthancPeer) -> list[str]:
    classes = []
    for instance in orthanc.get("/instances"):  # type: ignore[union-attr]
        tags = orthanc.get(f"/instances/{instance}/simplified-tags")
        classes.append(tags["SOPClassUID"])  # type: ignore[index]
    return sorted(classes)


@pytest.fixture
def node(tmp_path: Path) -> tuple[Database, Ingest, FileStore]:
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    db = Database(url)
    db.upgrade()
    store = FileStore(tmp_path / "node", fsync=False)
    return db, Ingest(db, store), store


def test_sr_and_key_image_reach_orthanc_by_c_store(tmp_path: Path, node) -> None:
    db, ingest, store = node
    with OrthancPeer() as pacs, OrthancPeer(ae_title="ARCHIVE2") as full:
        settings = Settings(
            data_dir=tmp_path / "node",
            fsync=False,
            forward_destinations=[
                ForwardDestination(
                    name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom_port
                ),
                ForwardDestination(
                    name="full",
                    ae_title="ARCHIVE2",
                    host="127.0.0.1",
                    port=full.dicom_port,
                    include_study=True,
                ),
            ],
        )
        made = triaged_study(db, ingest, settings, probability=0.97)
        counts = deliver_due(db, settings, store)
        assert counts["sent"] == 2, rows(db)

        assert orthanc_sop_classes(pacs) == sorted([SR_CLASS, SC_CLASS])
        assert len(full.get("/instances")) == SLICES + 2  # type: ignore[arg-type]
        (study,) = pacs.get("/studies")  # type: ignore[misc]
        tags = pacs.get(f"/studies/{study}")["MainDicomTags"]  # type: ignore[index]
        assert tags["StudyInstanceUID"] == made.study_instance_uid
        sent = rows(db)
        assert sent["dimse:pacs"].status == "sent" and sent["dimse:full"].status == "sent"
        # Nothing goes out twice.
        assert deliver_due(db, settings, store, now=utcnow() + timedelta(hours=1))["sent"] == 0
        assert len(pacs.get("/instances")) == 2  # type: ignore[arg-type]


def test_unreachable_destination_is_retried_later(tmp_path: Path, node) -> None:
    db, ingest, store = node
    settings = Settings(
        data_dir=tmp_path / "node",
        fsync=False,
        delivery_timeout_seconds=2,
        forward_destinations=[
            ForwardDestination(name="down", ae_title="NOBODY", host="127.0.0.1", port=free_port())
        ],
    )
    triaged_study(db, ingest, settings, probability=None)  # even "no model" SRs are forwarded
    now = utcnow()
    assert deliver_due(db, settings, store, now=now, clock=lambda: now)["pending"] == 1
    row = rows(db)["dimse:down"]
    assert row.last_error == "DeliveryError: no association with NOBODY@127.0.0.1:" + str(
        settings.forward_destinations[0].port
    )
    assert row.next_attempt_at > now


class StowReceiver:
    """A DICOMweb STOW-RS endpoint: POST /dicom-web/studies with multipart/related DICOM parts."""

    def __init__(self) -> None:
        self.datasets: list[pydicom.Dataset] = []
        self.content_types: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                receiver.content_types.append(self.headers["Content-Type"])
                if self.path != "/dicom-web/studies":
                    self.send_response(404)
                    self.end_headers()
                    return
                message = BytesParser(policy=HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body
                )
                for part in message.iter_parts():
                    assert part.get_content_type() == "application/dicom"
                    receiver.datasets.append(pydicom.dcmread(io.BytesIO(part.get_content())))
                answer = json.dumps({"00081190": {"vr": "UR", "Value": ["http://stow/studies"]}})
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def __enter__(self) -> StowReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_sr_and_key_image_by_stow_rs(tmp_path: Path, node) -> None:
    db, ingest, store = node
    with StowReceiver() as stow:
        settings = Settings(
            data_dir=tmp_path / "node",
            fsync=False,
            forward_dicomweb=[DicomwebDestination(name="web", url=stow.url)],
        )
        made = triaged_study(db, ingest, settings, probability=0.97)
        assert deliver_due(db, settings, store)["sent"] == 1, rows(db)
    assert stow.content_types[0].startswith("multipart/related")
    assert sorted(str(ds.SOPClassUID) for ds in stow.datasets) == sorted([SR_CLASS, SC_CLASS])
    assert {str(ds.StudyInstanceUID) for ds in stow.datasets} == {made.study_instance_uid}


def test_sr_and_key_image_by_stow_rs_into_another_pacs_triage_node(tmp_path: Path, node) -> None:
    """A second archive's real DICOMweb service (``/dicom-web``, bearer token) receives them."""
    db, ingest, store = node
    token = "stow-writer-token-0123456789"
    other_settings = Settings(
        data_dir=tmp_path / "other",
        fsync=False,
        http_port=0,
        http_tokens=[HttpToken(name="forwarder", token=token, scopes=["write"])],
    )
    other_db = Database(other_settings.resolved_database_url, durable=False)
    other_db.upgrade()
    other_store = FileStore(other_settings.data_dir, fsync=False)
    service = HttpService(
        other_settings,
        create_app(
            AppContext(
                settings=other_settings,
                db=other_db,
                file_store=other_store,
                ingest=Ingest(other_db, other_store),
                tokens=TokenBook.from_settings(other_settings),
            )
        ),
    )
    service.start()
    try:
        settings = Settings(
            data_dir=tmp_path / "node",
            fsync=False,
            forward_dicomweb=[
                DicomwebDestination(
                    name="other",
                    url=f"http://127.0.0.1:{service.port}/dicom-web",
                    headers={"Authorization": f"Bearer {token}"},
                )
            ],
        )
        made = triaged_study(db, ingest, settings, probability=0.97)
        assert deliver_due(db, settings, store)["sent"] == 1, rows(db)
    finally:
        service.stop()
    with other_db.reader() as session:
        received = session.execute(
            select(Instance.sop_class_uid, Study.study_instance_uid)
            .join(Series, Series.id == Instance.series_pk)
            .join(Study, Study.id == Series.study_pk)
        ).all()
    other_db.dispose()
    assert sorted(c for c, _ in received) == sorted([SR_CLASS, SC_CLASS])
    assert {uid for _, uid in received} == {made.study_instance_uid}
