"""C-FIND, C-MOVE and C-GET against a real node, with dcmtk, pynetdicom and Orthanc as peers.

One node (SQLite index) holds the real CT series, the transfer-syntax set and
the SR/SEG examples for the whole module; Orthanc plays a remote PACS that
queries the node and to which the node moves a study; dcmtk's storescp is a
second move destination.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from archive import status
from archive.config import Settings
from archive.db import Database
from archive.ingest import Ingest
from archive.scp import start_listening_server
from archive.store import FileStore
from tests.dicom_factory import dataset_bytes
from tests.index_factory import fill
from tests.peers import (
    STORESCU_PROPOSE,
    NodeProcess,
    OrthancPeer,
    StoreSCP,
    free_port,
    storescu,
)

pytestmark = pytest.mark.network

CT_STUDY = "1.3.6.1.4.1.14519.5.2.1.21087345762211724523378497892240459677"
SR_STUDY = "1.3.6.1.4.1.14519.5.2.1.2744.7002.150059977302243314164020079415"
GETSCU_PREFER = {
    "1.2.840.10008.1.2.1": "+xe",
    "1.2.840.10008.1.2.2": "+xb",
    "1.2.840.10008.1.2.5": "+xr",
    "1.2.840.10008.1.2.4.70": "+xs",
    "1.2.840.10008.1.2.4.80": "+xt",
    "1.2.840.10008.1.2.4.90": "+xv",
}
"""getscu option that proposes a stored transfer syntax. dcmtk 3.6's getscu proposes
only Explicit VR for storage even with +xi, so Implicit VR has its own test."""


@dataclass
class Site:
    node: NodeProcess
    storescp: StoreSCP
    orthanc: OrthancPeer
    sent: dict[str, bytes]
    """Data set bytes (after the File Meta) of every file the node stored, by SOP Instance UID."""


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory,
    dcmtk: None,
    ct_series_files: list[Path],
    transfer_syntax_files: list[Path],
    shared_data: Path,
) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("dimse")
    node_port = free_port()
    orthanc = OrthancPeer(modalities={"triage": ("PACS_TRIAGE", "127.0.0.1", node_port)})
    orthanc.start()
    scp = StoreSCP(root / "storescp", extra=["+B"]).start()
    destinations = [
        {"ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port},
        {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
    ]
    node = NodeProcess(
        root / "node",
        dicom_port=node_port,
        env={
            "PACS_TRIAGE_MOVE_DESTINATIONS": json.dumps(destinations),
            "PACS_TRIAGE_DICOM_WORKERS": "2",
            "PACS_TRIAGE_FSYNC": "false",
        },
    ).start()
    sent: dict[str, bytes] = {}
    try:
        result = storescu(node.dicom_port, ct_series_files)
        assert result.returncode == 0, result.stderr
        for path in transfer_syntax_files:
            ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            extra = [STORESCU_PROPOSE[ts]] if ts in STORESCU_PROPOSE else []
            result = storescu(node.dicom_port, [path], extra=extra)
            assert result.returncode == 0, result.stderr
        sr_seg = sorted((shared_data / "sr-seg" / "dcmqi" / "sr-example").glob("*.dcm"))
        result = storescu(node.dicom_port, sr_seg, extra=["-R"])
        assert result.returncode == 0, result.stderr
        # What the archive holds is what must come back, byte for byte.
        for path in (node.data_dir / "files").rglob("*.dcm"):
            sent[_sop_uid(path)] = dataset_bytes(path.read_bytes())
        assert len(sent) == len(ct_series_files) + len(transfer_syntax_files) + len(sr_seg)
        yield Site(node, scp, orthanc, sent)
    finally:
        node.stop()
        scp.stop()
        orthanc.stop()


def scu(
    tool: str, port: int, *keys: str, extra: tuple[str, ...] = (), timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run dcmtk's `tool` (findscu, movescu, getscu) in Study Root against the node."""
    args = [tool, "-S", *extra]
    for key in keys:
        args += ["-k", key]
    return subprocess.run(
        [*args, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def findscu(port: int, *keys: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return scu("findscu", port, *keys, extra=extra)


def _received(directory: Path) -> dict[str, bytes]:
    return {_sop_uid(p): dataset_bytes(p.read_bytes()) for p in directory.iterdir() if p.is_file()}


class TestFind:
    def test_findscu_study_level_with_derived_keys(self, site: Site) -> None:
        result = findscu(
            site.node.dicom_port,
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={CT_STUDY}",
            "NumberOfStudyRelatedInstances",
            "NumberOfStudyRelatedSeries",
            "ModalitiesInStudy",
            "PatientName",
        )
        assert result.returncode == 0, result.stderr
        assert "Find Response: 1 (Pending)" in result.stderr
        assert "Find Response: 2" not in result.stderr
        assert "[134 ]" in result.stderr  # NumberOfStudyRelatedInstances
        assert "ModalitiesInStudy" in result.stderr and "[CT]" in result.stderr

    def test_findscu_patient_root_wildcard_is_case_insensitive(self, site: Site) -> None:
        result = findscu(
            site.node.dicom_port,
            "QueryRetrieveLevel=PATIENT",
            "PatientName=pancreas*",
            "PatientID",
            extra=("-P",),
        )
        assert result.returncode == 0, result.stderr
        assert "Pancreas-CT-CB_001" in result.stderr

    def test_sr_and_seg_series_are_found(self, site: Site) -> None:
        for modality in ("SR", "SEG"):
            result = findscu(
                site.node.dicom_port,
                "QueryRetrieveLevel=SERIES",
                f"StudyInstanceUID={SR_STUDY}",
                f"Modality={modality}",
                "SeriesInstanceUID",
            )
            assert result.returncode == 0, result.stderr
            assert "Find Response: 1 (Pending)" in result.stderr, modality

    @pytest.mark.parametrize(
        ("keys", "expected"),
        [
            (("QueryRetrieveLevel=STUDY", "StudyDate=20201301-"), "unabletoprocess"),
            (("QueryRetrieveLevel=FRAME", "StudyDate="), "datasetdoesnotmatchsopclass"),
            (
                ("QueryRetrieveLevel=STUDY", "SeriesInstanceUID=1.2.3"),
                "datasetdoesnotmatchsopclass",
            ),
            (("QueryRetrieveLevel=STUDY", "PatientName=" + "*" * 400), "unabletoprocess"),
        ],
    )
    def test_malformed_identifier_gets_failure_status(
        self, site: Site, keys: tuple[str, ...], expected: str
    ) -> None:
        result = findscu(site.node.dicom_port, *keys, extra=("-v",))
        assert expected in result.stderr.lower(), result.stderr

    def test_pynetdicom_cancel_stops_pending_responses(self, tmp_path: Path) -> None:
        # 3000 matching studies, so the SCP is still sending when the C-CANCEL lands.
        url = f"sqlite:///{tmp_path / 'index.sqlite'}"
        db = Database(url)
        db.upgrade()
        fill(url, 3000)
        settings = Settings(
            data_dir=tmp_path, database_url=url, dicom_host="127.0.0.1", dicom_port=0
        )
        server = start_listening_server(settings, Ingest(db, FileStore(tmp_path, fsync=False)))
        port = server.server_address[1]
        ae = AE(ae_title="CANCELLER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", port)
        assert assoc.is_established
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.PatientName = "*"
        identifier.StudyInstanceUID = ""
        statuses = []
        try:
            for number, (rsp, _) in enumerate(
                assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
            ):
                statuses.append(rsp.Status)
                if number == 2:
                    assoc.send_c_cancel(1, query_model=StudyRootQueryRetrieveInformationModelFind)
        finally:
            assoc.release()
            server.shutdown()
            db.dispose()
        assert statuses[-1] == status.CANCEL
        assert len(statuses) < 3000


class TestMove:
    def test_movescu_study_to_storescp_is_byte_identical(self, site: Site) -> None:
        result = scu(
            "movescu",
            site.node.dicom_port,
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={CT_STUDY}",
            extra=("-aem", "STORESCP"),
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        received = _received(site.storescp.output_dir)
        ct = {uid: data for uid, data in site.sent.items() if uid in received}
        assert len(ct) >= 134
        for uid, data in ct.items():
            assert received[uid] == data

    def test_move_transfer_syntax_set_keeps_stored_syntaxes(
        self, site: Site, transfer_syntax_files: list[Path]
    ) -> None:
        study = str(
            pydicom.dcmread(transfer_syntax_files[0], stop_before_pixels=True).StudyInstanceUID
        )
        result = scu(
            "movescu",
            site.node.dicom_port,
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={study}",
            extra=("-aem", "STORESCP"),
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        received = _received(site.storescp.output_dir)
        for path in transfer_syntax_files:
            uid = _sop_uid(path)
            assert received[uid] == site.sent[uid], path.name

    def test_unknown_destination_refused(self, site: Site) -> None:
        result = scu(
            "movescu",
            site.node.dicom_port,
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={CT_STUDY}",
            extra=("-aem", "NOWHERE"),
        )
        assert "MoveDestinationUnknown" in result.stderr

    def test_orthanc_queries_and_moves_study_to_itself(self, site: Site) -> None:
        answers = site.orthanc.post(
            "/modalities/triage/query",
            {"Level": "Study", "Query": {"StudyInstanceUID": SR_STUDY, "ModalitiesInStudy": ""}},
        )
        query_id = answers["ID"]
        content = site.orthanc.get(f"/queries/{query_id}/answers?expand")
        assert len(content) == 1
        site.orthanc.post(
            f"/queries/{query_id}/retrieve", {"TargetAet": "ORTHANC", "Synchronous": True}
        )
        studies = site.orthanc.post(
            "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": SR_STUDY}}
        )
        assert len(studies) == 3


class TestGet:
    def test_getscu_ct_series_byte_identical(self, site: Site, tmp_path: Path) -> None:
        result = scu(
            "getscu",
            site.node.dicom_port,
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={CT_STUDY}",
            extra=("+B", "-od", str(tmp_path)),
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        received = _received(tmp_path)
        assert len(received) == 134
        for uid, data in received.items():
            assert data == site.sent[uid]

    def test_getscu_each_transfer_syntax_byte_identical(
        self, site: Site, transfer_syntax_files: list[Path], tmp_path: Path
    ) -> None:
        for path in transfer_syntax_files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if str(ds.file_meta.TransferSyntaxUID) not in GETSCU_PREFER:
                continue
            out = tmp_path / path.stem
            out.mkdir()
            result = scu(
                "getscu",
                site.node.dicom_port,
                "QueryRetrieveLevel=IMAGE",
                f"StudyInstanceUID={ds.StudyInstanceUID}",
                f"SeriesInstanceUID={ds.SeriesInstanceUID}",
                f"SOPInstanceUID={ds.SOPInstanceUID}",
                extra=("+B", GETSCU_PREFER[str(ds.file_meta.TransferSyntaxUID)], "-od", str(out)),
            )
            assert result.returncode == 0, result.stderr
            assert _received(out) == {ds.SOPInstanceUID: site.sent[ds.SOPInstanceUID]}, path.name

    def test_get_without_accepted_syntax_reports_partial_failure(
        self, site: Site, transfer_syntax_files: list[Path], tmp_path: Path
    ) -> None:
        # getscu proposes only uncompressed syntaxes by default: the compressed
        # instances cannot be sent unchanged, so the C-GET ends in Warning B000.
        study = str(
            pydicom.dcmread(transfer_syntax_files[0], stop_before_pixels=True).StudyInstanceUID
        )
        result = scu(
            "getscu",
            site.node.dicom_port,
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={study}",
            extra=("+B", "-od", str(tmp_path)),
        )
        assert "SubOperationsCompleteOneOrMoreFailures" in result.stderr, result.stderr
        assert 0 < len(list(tmp_path.iterdir())) < len(transfer_syntax_files)

    def test_getscu_implicit_instance_arrives_in_accepted_uncompressed_syntax(
        self, site: Site, transfer_syntax_files: list[Path], tmp_path: Path
    ) -> None:
        (path,) = [p for p in transfer_syntax_files if p.name == "2.dcm"]
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
        result = scu(
            "getscu",
            site.node.dicom_port,
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={ds.StudyInstanceUID}",
            f"SeriesInstanceUID={ds.SeriesInstanceUID}",
            f"SOPInstanceUID={ds.SOPInstanceUID}",
            extra=("-od", str(tmp_path)),
        )
        assert result.returncode == 0, result.stderr
        (received,) = [pydicom.dcmread(p) for p in tmp_path.iterdir()]
        assert received.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert received.SOPInstanceUID == ds.SOPInstanceUID
        assert received.PixelData == ds.PixelData
