"""Time to triage: last C-STORE response -> SR stored and triage state updated.

Sends the real 134-slice CT series (``../shared/data/ct-pancreas-tcia``, fresh
UIDs per run so every run is a new study) with dcmtk's ``storescu`` to a
``pacs-triage serve`` node in embedded mode (its managed Prefect server, the
flow in-process) with one test MONAI bundle whose rule matches the series
(``models.testing.make_bundle``, kind ``intensity``: a real bundle that
resizes the volume to 96^3 and runs a network on it). For each run it
measures from the end of storescu (the last C-STORE response, then the
release) until the study's triage state is final with its SR stored, and
splits the time into

- completeness wait (until the study was marked ready: the quiet period),
- dispatch (claim + Prefect flow run start),
- loading (index query, headers, pixel data -> volume),
- inference, SR (priority + TID 1500 report built and stored),
- bookkeeping (final state, follow-up hook, Prefect task overhead, detection).

The peer is Orthanc (Debian package) with ``StableAge`` set to our quiet
period, on the same series in the same run: the time from the end of
storescu until its ``StableStudy`` change appears (Orthanc's stable-study
event, the trigger Orthanc-based AI routers use). Orthanc runs no model, so
the comparison is of completeness detection; ours includes the analysis.

With ``--distributed`` the node submits to a separate ``prefect server`` and
a ``pacs-triage worker`` runs each flow in a new process (Prefect's process
worker), which shows what distributed mode adds.

Usage: ``python benchmarks/time_to_triage.py [--runs N] [--quiet S] [--distributed]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import select

from archive.db import Database
from archive.index import Study, StudyTriage, TriageJob
from archive.prefect_server import ManagedPrefectServer
from models.testing import make_bundle
from tests.peers import (
    CT_SERIES_DIR,
    REPO_ROOT,
    NodeProcess,
    OrthancPeer,
    hardware,
    storescu,
)

FINAL = ("triaged", "no_applicable_model", "failed")
TIMING_LINE = re.compile(
    r"study (?P<uid>[\d.]+) generation \d+ (?P<state>\w+) in (?P<total>[\d.]+) s "
    r"\(plan (?P<plan>[\d.]+), load (?P<load>[\d.]+), inference (?P<inference>[\d.]+), "
    r"report (?P<report>[\d.]+), bookkeeping (?P<bookkeeping>[\d.]+)\)"
)


def fresh_study(source: list[Path], directory: Path) -> tuple[str, list[Path]]:
    """A copy of the series as a new study (new Study/Series/SOP Instance UIDs)."""
    directory.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i, path in enumerate(source):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        target = directory / f"{i:04d}.dcm"
        ds.save_as(target)
        paths.append(target)
    return study, paths


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def wait_final(db: Database, study_uid: str, timeout: float = 300) -> tuple[float, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.reader() as session:
            row = session.execute(
                select(StudyTriage, TriageJob)
                .join(Study, Study.id == StudyTriage.study_pk)
                .join(
                    TriageJob,
                    (TriageJob.study_pk == StudyTriage.study_pk)
                    & (TriageJob.generation == StudyTriage.generation),
                )
                .where(Study.study_instance_uid == study_uid)
            ).first()
        if row is not None and row[0].state in FINAL:
            done = time.time()
            triage, job = row
            return done, {
                "state": triage.state,
                "ready": job.created_at.timestamp(),
                "started": triage.started_at.timestamp() if triage.started_at else None,
                "finished": triage.finished_at.timestamp(),
                "sr": triage.sr_sop_instance_uid,
                "reason": triage.failure_reason,
            }
        time.sleep(0.02)
    raise TimeoutError(f"study {study_uid} not triaged after {timeout} s")


def flow_split(log: Callable[[], str], study_uid: str) -> dict[str, float]:
    """The flow's own timing line (logged just after the state is written)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for match in TIMING_LINE.finditer(log()):
            if match.group("uid") == study_uid:
                return {k: float(match.group(k)) for k in ("plan", "load", "inference", "report")}
        time.sleep(0.05)
    raise LookupError(f"no timing line for {study_uid} in:\n{log()[-3000:]}")


def orthanc_stable(orthanc: OrthancPeer, files: list[Path]) -> float:
    """Seconds from the end of storescu to Orthanc's StableStudy change for the study."""
    last = int(orthanc.get("/changes?last")["Last"])  # type: ignore[index]
    result = storescu(orthanc.dicom_port, files, called=orthanc.ae_title)
    sent = time.time()
    assert result.returncode == 0, result.stderr
    while time.time() - sent < 300:
        changes = orthanc.get(f"/changes?since={last}&limit=1000")
        for change in changes["Changes"]:  # type: ignore[index]
            last = max(last, int(change["Seq"]))
            if change["ChangeType"] == "StableStudy":
                return time.time() - sent
        time.sleep(0.02)
    raise TimeoutError("Orthanc reported no StableStudy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="measured runs (after one warm-up)")
    parser.add_argument("--quiet", type=float, default=3.0, help="quiet period in seconds")
    parser.add_argument(
        "--release-quiet", type=float, default=1.0, help="quiet period after association release"
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="a separate prefect server and a pacs-triage worker instead of embedded mode",
    )
    args = parser.parse_args()
    source = sorted(CT_SERIES_DIR.glob("*.dcm"))
    if not source:
        sys.exit(f"no CT series at {CT_SERIES_DIR}")
    print(f"hardware: {hardware()}; load average {os.getloadavg()[0]:.1f} (shared machine)")
    print(
        f"series: {len(source)} CT slices 512x512 ({CT_SERIES_DIR.name}); "
        f"quiet period {args.quiet:g} s, {args.release_quiet:g} s once the association is released"
    )

    workdir = Path(tempfile.mkdtemp(prefix="time-to-triage-"))
    try:
        studies = [fresh_study(source, workdir / f"study{i}") for i in range(args.runs + 1)]
        models_dir = workdir / "models"
        make_bundle(
            models_dir,
            name="ct-benchmark",
            version="1.0.0",
            kind="intensity",
            rule={"modality": ["CT"]},
            spatial_size=(96, 96, 96),
            intensity_window=(-1000.0, 1000.0),
        )
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(
            {
                "PACS_TRIAGE_MODELS_DIRS": json.dumps([str(models_dir)]),
                "PACS_TRIAGE_STABLE_AFTER_SECONDS": str(args.quiet),
                "PACS_TRIAGE_STABLE_AFTER_RELEASE_SECONDS": str(args.release_quiet),
            }
        )
        server: ManagedPrefectServer | None = None
        worker: subprocess.Popen[bytes] | None = None
        if args.distributed:
            server = ManagedPrefectServer(workdir / "prefect-server")
            server.start()
            if not server.wait():
                sys.exit(f"Prefect server did not start: {server.error}")
            env["PREFECT_API_URL"] = server.api_url
            env["PREFECT_HOME"] = str(workdir / "prefect-client")
        node = NodeProcess(workdir / "node", env=env, triage=True)
        started = time.monotonic()
        node.start()
        db = Database(f"sqlite:///{node.data_dir / 'index.sqlite'}")
        worker_log = workdir / "worker.log"
        log: Callable[[], str] = node.log
        try:
            if args.distributed:
                worker = subprocess.Popen(
                    [sys.executable, "-m", "archive.cli", "worker"],
                    env=node.env,
                    stdout=worker_log.open("wb"),
                    stderr=subprocess.STDOUT,
                    cwd=str(REPO_ROOT),
                    start_new_session=True,
                )

                def log() -> str:
                    return worker_log.read_text(errors="replace")

                print("mode: distributed (prefect server + pacs-triage worker, process per run)")
            else:
                while "Prefect server ready" not in node.log():
                    if time.monotonic() - started > 300:
                        sys.exit("managed Prefect server did not start:\n" + node.log()[-3000:])
                    time.sleep(0.1)
                print(
                    f"mode: embedded; node start to Prefect server ready: "
                    f"{time.monotonic() - started:.1f} s"
                )
            rows = []
            for i, (study_uid, files) in enumerate(studies):
                result = storescu(node.dicom_port, files, called="PACS_TRIAGE")
                sent = time.time()
                assert result.returncode == 0, result.stderr
                done, info = wait_final(db, study_uid)
                if info["state"] != "triaged" or not info["sr"]:
                    sys.exit(f"run {i}: {info}")
                split = flow_split(log, study_uid)
                total = done - sent
                wait = info["ready"] - sent
                dispatch = (info["started"] or info["ready"]) - info["ready"]
                work = split["plan"] + split["load"] + split["inference"] + split["report"]
                row = {
                    "total": total,
                    "wait": wait,
                    "dispatch": dispatch,
                    "loading": split["plan"] + split["load"],
                    "inference": split["inference"],
                    "sr": split["report"],
                    "bookkeeping": total - wait - dispatch - work,
                }
                label = "warm-up" if i == 0 else f"run {i}"
                print(
                    f"{label:8s} total {total:6.2f} s = wait {wait:5.2f} + dispatch "
                    f"{dispatch:5.2f} + loading {row['loading']:5.2f} + inference "
                    f"{row['inference']:5.2f} + SR {row['sr']:5.2f} + bookkeeping "
                    f"{row['bookkeeping']:5.2f}"
                )
                if i:
                    rows.append(row)
        finally:
            if worker is not None:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(30)
            node.stop()
            if server is not None:
                server.stop()
            db.dispose()

        with OrthancPeer(extra_config={"StableAge": max(1, round(args.quiet))}) as orthanc:
            orthanc_times = [orthanc_stable(orthanc, files) for _, files in studies[1:]]

        print()
        print(f"pacs-triage, {len(rows)} runs (seconds):")
        for key in ("total", "wait", "dispatch", "loading", "inference", "sr", "bookkeeping"):
            values = [r[key] for r in rows]
            print(
                f"  {key:12s} p50 {statistics.median(values):6.2f}  "
                f"p95 {percentile(values, 95):6.2f}"
            )
        beyond = [r["total"] - args.release_quiet for r in rows]
        p95_beyond = percentile(beyond, 95)
        print(
            f"  beyond the quiet period ({args.release_quiet:g} s after release): "
            f"p50 {statistics.median(beyond):.2f}  p95 {p95_beyond:.2f}  "
            f"(bar: p95 < 10 s: {'met' if p95_beyond < 10 else 'NOT met'})"
        )
        print(
            f"Orthanc StableStudy (StableAge {max(1, round(args.quiet))} s), "
            f"{len(orthanc_times)} runs: p50 {statistics.median(orthanc_times):.2f}  "
            f"p95 {percentile(orthanc_times, 95):.2f} (completeness only, no analysis)"
        )
        wait_p50 = statistics.median([r["wait"] for r in rows])
        print(
            f"completeness detection, ours / Orthanc's (p50): "
            f"{wait_p50:.2f} / {statistics.median(orthanc_times):.2f} = "
            f"{wait_p50 / statistics.median(orthanc_times):.2f}"
        )
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        total_p50 = statistics.median([r["total"] for r in rows])
        print(
            f"whole time to triage, ours / Orthanc's stable event alone (p50): "
            f"{total_p50 / statistics.median(orthanc_times):.2f}"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
