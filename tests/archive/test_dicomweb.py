"""DICOMweb against a real node on PostgreSQL, with dicomweb-client: STOW, QIDO, WADO.

One node for the module; the real CT series and the transfer-syntax set go in
through STOW-RS and come back byte-identical through WADO-RS.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from tests.peers import NodeProcess

pytestmark = pytest.mark.network

CT_STUDY = "1.3.6.1.4.1.14519.5.2.1.21087345762211724523378497892240459677"
SR_STUDY = "1.3.6.1.4.1.14519.5.2.1.2744.7002.150059977302243314164020079415"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, postgres) -> Iterator[NodeProcess]:  # type: ignore[no-untyped-def]
    url = postgres.create()
    process = NodeProcess(
        tmp_path_factory.mktemp("dicomweb") / "node",
        env={"PACS_TRIAGE_DATABASE_URL": url, "PACS_TRIAGE_FSYNC": "false"},
    ).start()
    yield process
    process.stop()
    postgres.drop(url)


@pytest.fixture(scope="module")
def client(node: NodeProcess) -> DICOMwebClient:
    return DICOMwebClient(f"{node.http_url}/dicom-web", headers=node.auth_headers)


@pytest.fixture(scope="module")
def stored(
    client: DICOMwebClient,
    ct_series_files: list[Path],
    transfer_syntax_files: list[Path],
    shared_data: Path,
) -> dict[str, bytes]:
    """STOW-RS everything once; the stored bytes of each file by SOP Instance UID."""
    files = [
        *ct_series_files,
        *transfer_syntax_files,
        *sorted((shared_data / "sr-seg" / "dcmqi" / "sr-example").glob("*.dcm")),
    ]
    datasets = [pydicom.dcmread(f) for f in files]
    response = client.store_instances(datasets)
    assert len(response.ReferencedSOPSequence) == len(files)
    assert "FailedSOPSequence" not in response
    return {str(ds.SOPInstanceUID): f.read_bytes() for ds, f in zip(datasets, files, strict=True)}


def _raw_stow(node: NodeProcess, parts: list[bytes], content_type: str | None = None):  # type: ignore[no-untyped-def]
    boundary = "test-boundary-1234"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
            for p in parts
        )
        + f"--{boundary}--\r\n".encode()
    )
    return requests.post(
        f"{node.http_url}/dicom-web/studies",
        data=body,
        headers={
            **node.auth_headers,
            "Content-Type": content_type
            or f'multipart/related; type="application/dicom"; boundary={boundary}',
        },
        timeout=60,
    )


class TestStow:
    def test_one_bad_instance_among_good_ones_gets_202(
        self, node: NodeProcess, stored: dict[str, bytes]
    ) -> None:
        good = next(iter(stored.values()))
        response = _raw_stow(node, [good, b"not a dicom file at all" * 10])
        assert response.status_code == 202
        body = response.json()
        failed = body["00081198"]["Value"]
        assert len(failed) == 1 and "00081197" in failed[0]
        assert len(body["00081199"]["Value"]) == 1

    def test_all_bad_gets_409(self, node: NodeProcess, stored: dict[str, bytes]) -> None:
        response = _raw_stow(node, [b"garbage" * 40])
        assert response.status_code == 409

    def test_unsupported_media_type_gets_415(self, node: NodeProcess) -> None:
        response = _raw_stow(
            node, [b"{}"], 'multipart/related; type="application/dicom+json"; boundary=x'
        )
        assert response.status_code == 415
        response = _raw_stow(node, [b"{}"], "application/json")
        assert response.status_code == 415

    def test_store_needs_write_scope(self, node: NodeProcess) -> None:
        response = requests.post(f"{node.http_url}/dicom-web/studies", timeout=10)
        assert response.status_code == 401


class TestQido:
    def test_search_studies_by_patient_id(
        self, client: DICOMwebClient, stored: dict[str, bytes]
    ) -> None:
        studies = client.search_for_studies(search_filters={"PatientID": "Pancreas-CT-CB_001"})
        assert [s["0020000D"]["Value"][0] for s in studies] == [CT_STUDY]
        assert studies[0]["00201208"]["Value"] == [134]

    def test_sr_in_study_is_found(self, client: DICOMwebClient, stored: dict[str, bytes]) -> None:
        series = client.search_for_series(CT_STUDY, search_filters={"Modality": "SR"})
        assert series == []
        series = client.search_for_series(SR_STUDY, search_filters={"Modality": "SR"})
        assert len(series) == 1
        studies = client.search_for_studies(search_filters={"ModalitiesInStudy": "SEG"})
        assert SR_STUDY in [s["0020000D"]["Value"][0] for s in studies]

    def test_fuzzy_limit_offset_includefield(
        self, client: DICOMwebClient, stored: dict[str, bytes]
    ) -> None:
        studies = client.search_for_studies(
            search_filters={"PatientName": "pancreas"},
            fuzzymatching=True,
            fields=["StudyDescription"],
        )
        assert [s["0020000D"]["Value"][0] for s in studies] == [CT_STUDY]
        assert "00081030" in studies[0]
        instances = client.search_for_instances(CT_STUDY, limit=10, offset=130)
        assert len(instances) == 4

    @pytest.mark.parametrize(
        "query",
        [
            "StudyDate=20201301",
            "StudyDate=2020-2019",
            "NoSuchAttribute=1",
            "limit=-1",
            "StudyInstanceUID=1.2.*",
            "PatientName=" + "*" * 500,
            "StudyInstanceUID=1'%20OR%20'1'='1",
        ],
    )
    def test_malformed_query_gets_400(self, node: NodeProcess, query: str) -> None:
        response = requests.get(
            f"{node.http_url}/dicom-web/studies?{query}", headers=node.auth_headers, timeout=10
        )
        assert response.status_code == 400, response.text
        assert response.json()["detail"]


class TestWado:
    def test_study_and_transfer_syntaxes_come_back_byte_identical(
        self, node: NodeProcess, stored: dict[str, bytes], transfer_syntax_files: list[Path]
    ) -> None:
        study = str(
            pydicom.dcmread(transfer_syntax_files[0], stop_before_pixels=True).StudyInstanceUID
        )
        for uid in (CT_STUDY, study):
            response = requests.get(
                f"{node.http_url}/dicom-web/studies/{uid}",
                headers={
                    **node.auth_headers,
                    "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
                },
                timeout=120,
            )
            assert response.status_code == 200
            client = DICOMwebClient(f"{node.http_url}/dicom-web")
            parts = list(client._decode_multipart_message(response, stream=False))
            for part in parts:
                sop = str(pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True).SOPInstanceUID)
                assert part == stored[sop]
        assert len(parts) == len(transfer_syntax_files)

    def test_metadata_has_bulk_data_uri(
        self, client: DICOMwebClient, stored: dict[str, bytes]
    ) -> None:
        metadata = client.retrieve_study_metadata(SR_STUDY)
        assert len(metadata) == 3
        seg = next(m for m in metadata if m["00080060"]["Value"] == ["SEG"])
        assert "BulkDataURI" in seg["7FE00010"]

    def test_rendered_and_thumbnail(
        self, node: NodeProcess, client: DICOMwebClient, stored: dict[str, bytes]
    ) -> None:
        (instance,) = client.search_for_instances(CT_STUDY, search_filters={"InstanceNumber": "60"})
        retrieve_url = instance["00081190"]["Value"][0]
        url = node.http_url + retrieve_url[retrieve_url.index("/dicom-web/") :]
        png = requests.get(
            f"{url}/rendered?window=40,400",
            headers={**node.auth_headers, "Accept": "image/png"},
            timeout=30,
        )
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        jpeg = requests.get(f"{url}/thumbnail", headers=node.auth_headers, timeout=30)
        assert jpeg.status_code == 200 and jpeg.content[:2] == b"\xff\xd8"
        bad = requests.get(f"{url}/rendered?window=40", headers=node.auth_headers, timeout=30)
        assert bad.status_code == 400

    def test_frames(self, client: DICOMwebClient, stored: dict[str, bytes]) -> None:
        (instance,) = client.search_for_instances(CT_STUDY, search_filters={"InstanceNumber": "1"})
        series = instance["0020000E"]["Value"][0]
        sop = instance["00080018"]["Value"][0]
        (frame,) = client.retrieve_instance_frames(CT_STUDY, series, sop, frame_numbers=[1])
        assert len(frame) == 512 * 512 * 2

    def test_unknown_study_gets_404_and_bad_uid_400(self, node: NodeProcess) -> None:
        missing = requests.get(
            f"{node.http_url}/dicom-web/studies/1.2.3.4", headers=node.auth_headers, timeout=10
        )
        assert missing.status_code == 404
        bad = requests.get(
            f"{node.http_url}/dicom-web/studies/1.2.x", headers=node.auth_headers, timeout=10
        )
        assert bad.status_code == 400

    def test_read_needs_token(self, node: NodeProcess) -> None:
        response = requests.get(f"{node.http_url}/dicom-web/studies", timeout=10)
        assert response.status_code == 401
