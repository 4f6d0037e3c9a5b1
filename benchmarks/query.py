"""Query latency: C-FIND and QIDO-RS on pacs-triage (SQLite, PostgreSQL) against Orthanc.

Fills an index with synthetic rows (default 100k studies, 1M instances: bulk
SQL inserts, no files), starts a real ``pacs-triage serve`` on it, and times
study-level queries by PatientID, AccessionNumber, StudyInstanceUID, a one-day
StudyDate range and a PatientName prefix wild card: C-FIND from pynetdicom on
one kept association (TCP_NODELAY on the SCU socket) and QIDO-RS over one
keep-alive HTTP session. Orthanc (Debian package) is loaded with as many of the
same studies as ``--orthanc-studies`` (one instance each, through its REST API)
and answers the same C-FIND queries; its REST ``/tools/find`` stands in for
QIDO-RS (the DICOMweb plugin is not installed). PostgreSQL runs in a database
``bench_query`` created and dropped by the script.

Run: ``python -m benchmarks.query [--studies 100000] [--orthanc-studies 2000]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from archive.db import Database
from tests.dicom_factory import ct_dataset, part10_bytes
from tests.index_factory import INSTANCES_PER_SERIES, SERIES_PER_STUDY, fill, study_values
from tests.peers import NodeProcess, OrthancPeer, hardware

PG_ADMIN_URL = os.environ.get(
    "PACS_TRIAGE_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test"
)
REPEATS = 60


def queries(studies: int, rng: random.Random) -> dict[str, Callable[[], dict[str, str]]]:
    """Each typical query, as a maker of random instances of it."""

    def pick() -> dict[str, str]:
        return study_values(rng.randrange(studies))

    def date_range() -> dict[str, str]:
        d = pick()["StudyDate"]
        return {"StudyDate": f"{d}-{d}"}  # a one-day range: ~30 of 100k studies

    return {
        "PatientID": lambda: {"PatientID": pick()["PatientID"]},
        "AccessionNumber": lambda: {"AccessionNumber": pick()["AccessionNumber"]},
        "StudyInstanceUID": lambda: {"StudyInstanceUID": pick()["StudyInstanceUID"]},
        "StudyDate range": date_range,
        "PatientName wildcard": lambda: {"PatientName": pick()["PatientName"][:13] + "*"},
    }


def time_cfind(port: int, make: Callable[[], dict[str, str]]) -> list[float]:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="ANY")
    assert assoc.is_established, "association refused"
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    try:
        for _ in range(REPEATS):
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = ""
            identifier.PatientName = ""
            identifier.StudyDate = ""
            identifier.NumberOfStudyRelatedInstances = ""
            for keyword, value in make().items():
                setattr(identifier, keyword, value)
            start = time.perf_counter()
            responses = list(
                assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
            )
            times.append((time.perf_counter() - start) * 1000)
            assert responses[-1][0].Status == 0, hex(responses[-1][0].Status)
    finally:
        assoc.release()
    return times


def time_http(
    do: Callable[[dict[str, str]], int], make: Callable[[], dict[str, str]]
) -> list[float]:
    times = []
    for _ in range(REPEATS):
        params = make()
        start = time.perf_counter()
        code = do(params)
        times.append((time.perf_counter() - start) * 1000)
        assert code == 200, code
    return times


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(results: dict[tuple[str, str, str], list[float]]) -> None:
    print(f"\n{'peer':<22}{'service':<10}{'query':<22}{'p50 ms':>9}{'p95 ms':>9}")
    for (peer, service, name), times in results.items():
        print(f"{peer:<22}{service:<10}{name:<22}{p(times, 0.5):9.2f}{p(times, 0.95):9.2f}")


def mark_triaged(url: str) -> None:
    """Record every synthetic study as already triaged, as in an archive in service.

    Otherwise all of them are stability candidates: the node would either mark
    100k studies ready while we measure (a burst of writes), or, with an endless
    quiet period, rescan all of them on every stability poll.
    """
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO study_triage (study_pk, generation, state, ready_at, updated_at) "
                "SELECT id, 1, 'triaged', last_received_at, last_received_at FROM study"
            )
        )
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--orthanc-studies", type=int, default=2000)
    args = parser.parse_args()
    print(hardware())
    print(
        f"index: {args.studies} studies, {args.studies * SERIES_PER_STUDY} series, "
        f"{args.studies * SERIES_PER_STUDY * INSTANCES_PER_SERIES} instances"
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-query-"))
    admin = create_engine(make_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    pg_url = make_url(PG_ADMIN_URL).set(database="bench_query").render_as_string(False)
    results: dict[tuple[str, str, str], list[float]] = {}
    rng = random.Random(7)
    try:
        with admin.connect() as conn:
            conn.execute(text('DROP DATABASE IF EXISTS "bench_query" WITH (FORCE)'))
            conn.execute(text('CREATE DATABASE "bench_query"'))
        backends = {
            "pacs-triage SQLite": f"sqlite:///{workdir / 'index.sqlite'}",
            "pacs-triage PostgreSQL": pg_url,
        }
        for name, url in backends.items():
            start = time.perf_counter()
            Database(url).upgrade()
            fill(url, args.studies)
            mark_triaged(url)
            print(f"{name}: filled in {time.perf_counter() - start:.0f} s")
            node = NodeProcess(
                workdir / name.split()[-1],
                env={
                    "PACS_TRIAGE_DATABASE_URL": url,
                    "PACS_TRIAGE_FSYNC": "false",
                },
            ).start()
            try:
                for query, make in queries(args.studies, rng).items():
                    results[(name, "C-FIND", query)] = time_cfind(node.dicom_port, make)
                    # A new keep-alive session per query: uvicorn closes idle ones after 5 s.
                    session = requests.Session()
                    session.headers.update(node.auth_headers)

                    def qido(
                        params: dict[str, str],
                        session: requests.Session = session,
                        node: NodeProcess = node,
                    ) -> int:
                        return session.get(
                            f"{node.http_url}/dicom-web/studies", params=params, timeout=30
                        ).status_code

                    results[(name, "QIDO-RS", query)] = time_http(qido, make)
            finally:
                node.stop()
        with OrthancPeer() as orthanc:
            start = time.perf_counter()
            http = requests.Session()
            for n in range(args.orthanc_studies):
                v = study_values(n * (args.studies // args.orthanc_studies))
                ds = ct_dataset(
                    study_instance_uid=v["StudyInstanceUID"],
                    series_instance_uid=v["StudyInstanceUID"] + ".1",
                    sop_instance_uid=v["StudyInstanceUID"] + ".1.1",
                    patient_id=v["PatientID"],
                    patient_name=v["PatientName"],
                    accession_number=v["AccessionNumber"],
                    study_date=v["StudyDate"],
                    rows=8,
                    columns=8,
                )
                http.post(f"{orthanc.url}/instances", data=part10_bytes(ds), timeout=30)
            print(
                f"Orthanc: loaded {args.orthanc_studies} studies in "
                f"{time.perf_counter() - start:.0f} s"
            )
            loaded = [
                n * (args.studies // args.orthanc_studies) for n in range(args.orthanc_studies)
            ]
            orthanc_rng = random.Random(7)

            def pick_loaded() -> dict[str, str]:
                return study_values(orthanc_rng.choice(loaded))

            orthanc_queries = {
                "PatientID": lambda: {"PatientID": pick_loaded()["PatientID"]},
                "AccessionNumber": lambda: {"AccessionNumber": pick_loaded()["AccessionNumber"]},
                "StudyInstanceUID": lambda: {"StudyInstanceUID": pick_loaded()["StudyInstanceUID"]},
                "StudyDate range": lambda: {
                    "StudyDate": (d := pick_loaded()["StudyDate"]) + f"-{d}"
                },
                "PatientName wildcard": lambda: {
                    "PatientName": pick_loaded()["PatientName"][:13] + "*"
                },
            }
            for query, make in orthanc_queries.items():
                results[("Orthanc", "C-FIND", query)] = time_cfind(orthanc.dicom_port, make)
                http = requests.Session()

                def rest_find(params: dict[str, str], http: requests.Session = http) -> int:
                    body = {"Level": "Study", "Query": params, "Expand": True}
                    return http.post(
                        f"{orthanc.url}/tools/find", data=json.dumps(body), timeout=30
                    ).status_code

                results[("Orthanc", "REST find", query)] = time_http(rest_find, make)
        report(results)
        print(
            "\nratios (Orthanc C-FIND p50 / pacs-triage C-FIND p50; > 1 means pacs-triage faster):"
        )
        for query in queries(1, rng):
            orthanc_p50 = p(results[("Orthanc", "C-FIND", query)], 0.5)
            for name in backends:
                ours = p(results[(name, "C-FIND", query)], 0.5)
                print(f"  {query:<22}{name:<24}{orthanc_p50 / ours:6.2f}")
        print(f"(Orthanc held {args.orthanc_studies} studies; pacs-triage held {args.studies})")
    finally:
        with admin.connect() as conn:
            conn.execute(text('DROP DATABASE IF EXISTS "bench_query" WITH (FORCE)'))
        admin.dispose()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
