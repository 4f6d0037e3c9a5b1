"""Benchmark: list the most urgent 100 of N studies, pacs-triage's worklist against Orthanc.

pacs-triage: ``GET /api/worklist?limit=100`` (every unread study ordered by
aged priority, then paged) on a real uvicorn server with a SQLite index.
Orthanc (Debian package, the peer): ``POST /tools/find`` at study level with
``Expand`` and ``Limit 100`` (unordered: Orthanc has no worklist order) over
the same N studies. Prints the median latency of several requests, the ratio
to Orthanc, and the hardware. This is not a test: nothing is asserted.

Usage: python benchmarks/worklist.py [--studies N] [--requests R]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from archive.config import HttpToken, Settings  # noqa: E402
from archive.db import Database  # noqa: E402
from archive.http import AppContext, HttpService, TokenBook, create_app  # noqa: E402
from archive.ingest import Ingest  # noqa: E402
from archive.store import FileStore  # noqa: E402
from tests.dicom_factory import ct_dataset, part10_bytes  # noqa: E402
from tests.peers import OrthancPeer  # noqa: E402

TOKEN = "benchmark-token-0123456789"


def _median_ms(call, requests: int) -> float:  # type: ignore[no-untyped-def]
    call()  # warm up
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-worklist-"))
    settings = Settings(
        data_dir=workdir,
        fsync=False,
        http_port=0,
        http_tokens=[HttpToken(name="bench", token=TOKEN, scopes=["read"])],
    )
    db = Database(settings.resolved_database_url, durable=False)
    db.upgrade()
    store = FileStore(workdir, fsync=False)
    ingest = Ingest(db, store)
    instances = [part10_bytes(ct_dataset(rows=4, columns=4, seed=i)) for i in range(args.studies)]
    for data in instances:
        assert ingest.store(data).ok
    service = HttpService(
        settings,
        create_app(
            AppContext(
                settings=settings,
                db=db,
                file_store=store,
                ingest=ingest,
                tokens=TokenBook.from_settings(settings),
            )
        ),
    )
    service.start()
    with OrthancPeer() as orthanc, httpx.Client(timeout=60) as client:
        for data in instances:
            client.post(f"{orthanc.url}/instances", content=data).raise_for_status()
        ours_url = f"http://127.0.0.1:{service.port}/api/worklist?limit=100"
        headers = {"Authorization": f"Bearer {TOKEN}"}

        def ours() -> None:
            response = client.get(ours_url, headers=headers)
            assert response.status_code == 200 and len(response.json()["items"]) == 100

        def peer() -> None:
            response = client.post(
                f"{orthanc.url}/tools/find",
                json={"Level": "Study", "Query": {}, "Expand": True, "Limit": 100},
            )
            assert response.status_code == 200 and len(response.json()) == 100

        ours_ms = _median_ms(ours, args.requests)
        peer_ms = _median_ms(peer, args.requests)
    service.stop()
    db.dispose()
    print(f"{args.studies} studies, top 100, median of {args.requests} requests")
    print(f"  pacs-triage /api/worklist (ordered, aged): {ours_ms:8.1f} ms")
    print(f"  Orthanc /tools/find (unordered):          {peer_ms:8.1f} ms")
    print(f"  ratio pacs-triage / Orthanc:              {ours_ms / peer_ms:8.2f}")
    print(
        f"hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"visible, Python {platform.python_version()}, {platform.system()}"
    )


if __name__ == "__main__":
    main()
