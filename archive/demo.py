"""``pacs-triage demo``: a whole node with its worklist, fed like a modality would feed it.

Starts a node in a fresh data directory (a temporary one unless given),
writes a positive and a negative synthetic head CT (:func:`models.phantoms.write_head_ct`),
sends them and the real CT from ``../shared/data`` (when present) to the node
with a real DICOM client (pynetdicom C-STORE SCU, as a modality would), waits
until the AI has triaged every study, prints the worklist in its order, the
worklist page's address and a token to log in with, and keeps the node
running until Ctrl-C (``--exit`` stops at once, for scripts and tests).
Everything it prints is synthetic or de-identified test data.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.presentation import build_context

from archive.config import HttpToken, Settings
from archive.db import Database
from archive.index import utcnow
from archive.logs import configure_logging
from archive.worklist import service

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_CT_ENV = "PACS_TRIAGE_DEMO_CT"
REAL_CT_CANDIDATES = (
    REPO_ROOT.parent / "shared" / "data" / "ct-pancreas-tcia",
    Path("/work/shared/data/ct-pancreas-tcia"),
)
FINAL_STATES = {"triaged", "no_applicable_model", "failed"}
CALLING_AE_TITLE = "DEMO_MODALITY"
POSITIVE_SEED = 900_000
NEGATIVE_SEED = 900_001
"""Phantom seeds outside the shipped model's training, validation and test ranges."""


@dataclass
class DemoStudy:
    """One study the demo sends, and what it is."""

    label: str
    files: list[Path]
    study_instance_uid: str = ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_real_ct(explicit: str | None) -> Path | None:
    """The real CT series folder: `explicit`, ``$PACS_TRIAGE_DEMO_CT``, or ../shared/data."""
    for candidate in (explicit, os.environ.get(REAL_CT_ENV), *REAL_CT_CANDIDATES):
        if candidate and Path(candidate).is_dir() and any(Path(candidate).glob("*.dcm")):
            return Path(candidate)
    return None


def send_files(
    host: str, port: int, called_ae_title: str, files: list[Path], attempts: int = 3
) -> int:
    """C-STORE `files` as a modality does; returns how many the node stored.

    One association per attempt; like a modality, it tries again (up to
    `attempts` times) with the files not yet stored when an association is
    refused or aborted.

    References
    ----------
    PS3.4 B.2 Storage Service Class; PS3.7 9.1.1 C-STORE.
    """
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    contexts = {(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)): None for h in headers}
    ae = AE(ae_title=CALLING_AE_TITLE)
    ae.requested_contexts = [build_context(sop, ts) for sop, ts in contexts]
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    remaining = list(files)
    stored = 0
    for attempt in range(1, attempts + 1):
        assoc = ae.associate(host, port, ae_title=called_ae_title)
        if not assoc.is_established:
            logger.warning("association attempt %d refused or aborted", attempt)
            time.sleep(1.0)
            continue
        try:
            while remaining and assoc.is_established:
                status = assoc.send_c_store(remaining[0])
                if "Status" in status and int(status.Status) in (0x0000, 0xB000, 0xB006, 0xB007):
                    remaining.pop(0)
                    stored += 1
                elif "Status" in status:
                    remaining.pop(0)  # refused with a status: sending again will not help
                    logger.warning("C-STORE refused: 0x%04X", int(status.Status))
        except RuntimeError as exc:  # the association was aborted under us
            logger.warning("association attempt %d ended: %s", attempt, exc)
        finally:
            if assoc.is_established:
                assoc.release()
        if not remaining:
            break
    return stored


def _studies(workdir: Path, real_ct: Path | None) -> list[DemoStudy]:
    from models.phantoms import write_head_ct

    studies = [
        DemoStudy(
            "synthetic head CT with hemorrhage",
            write_head_ct(
                workdir / "positive", positive=True, seed=POSITIVE_SEED, patient_id="DEMO-ICH-POS"
            ),
        ),
        DemoStudy(
            "synthetic head CT without hemorrhage",
            write_head_ct(
                workdir / "negative", positive=False, seed=NEGATIVE_SEED, patient_id="DEMO-ICH-NEG"
            ),
        ),
    ]
    if real_ct is not None:
        studies.append(DemoStudy("real CT (TCIA pancreas CT)", sorted(real_ct.glob("*.dcm"))))
    for study in studies:
        study.study_instance_uid = str(
            pydicom.dcmread(study.files[0], stop_before_pixels=True).StudyInstanceUID
        )
    return studies


def wait_for_triage(
    db: Database, studies: list[DemoStudy], timeout: float
) -> dict[str, service.WorklistItem]:
    """Poll the worklist until every study is in a final triage state (or `timeout` s)."""
    deadline = time.monotonic() + timeout
    items: dict[str, service.WorklistItem] = {}
    while True:
        for study in studies:
            with contextlib.suppress(service.NotFoundError):
                _, items[study.study_instance_uid] = service.get_item(
                    db, study.study_instance_uid, utcnow()
                )
        done = [
            s
            for s in studies
            if s.study_instance_uid in items
            and items[s.study_instance_uid].triage_state in FINAL_STATES
        ]
        if len(done) == len(studies) or time.monotonic() > deadline:
            return items
        time.sleep(0.5)


def format_worklist(items: list[service.WorklistItem], labels: dict[str, str]) -> str:
    """The worklist as text, most urgent first, one line per study."""
    lines = []
    for position, item in enumerate(items, start=1):
        priority = item.priority_class or "-"
        state = "" if item.headline.startswith(item.triage_label) else f"{item.triage_label}: "
        lines.append(
            f"{position:>3}. {priority:<8} {(state + item.headline)[:70]:<70} "
            f"[{labels.get(item.study_instance_uid, item.study_description)}]"
        )
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """The ``demo`` subcommand."""
    from archive.node import Node

    configure_logging("INFO" if args.verbose else "WARNING")
    if not args.verbose:
        # The flow runs in this process (and a managed Prefect server in a child):
        # keep their per-task INFO lines out of the demo's output.
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_ROOT_LEVEL", "WARNING")
        warnings.filterwarnings("ignore", category=UserWarning, module="highdicom")
    signal.signal(signal.SIGTERM, _interrupt)  # stop the node cleanly on SIGTERM too
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="pacs-triage-demo-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    http_port = args.http_port or _free_port()
    settings = Settings(
        data_dir=data_dir,
        dicom_host="127.0.0.1",
        dicom_port=args.dicom_port or _free_port(),
        http_host="127.0.0.1",
        http_port=http_port,
        dicom_workers=1,
        fsync=False,
        stable_after_seconds=2.0,
        stable_after_release_seconds=0.5,
        http_tokens=[HttpToken(name="demo", token=token, scopes=["admin"])],
        log_level="INFO" if args.verbose else "WARNING",
    )
    real_ct = find_real_ct(args.real_ct)
    print(f"pacs-triage demo: data in {data_dir}", flush=True)
    node = Node(settings)
    node.start()
    try:
        studies = _studies(data_dir / "generated", real_ct)
        if real_ct is None:
            print(
                f"(no real CT found; set {REAL_CT_ENV} or pass --real-ct to include one)",
                flush=True,
            )
        for study in studies:
            stored = send_files("127.0.0.1", node.dicom.port, settings.ae_title, study.files)
            print(f"sent {stored}/{len(study.files)} images: {study.label}", flush=True)
        print("waiting for the AI triage of every study ...", flush=True)
        items = wait_for_triage(node.db, studies, args.timeout)
        flt = service.WorklistFilter(limit=1000)
        ordered, _ = service.list_worklist(node.db, flt, utcnow())
        labels = {s.study_instance_uid: s.label for s in studies}
        print("\nWorklist, most urgent first:")
        print(format_worklist(ordered, labels))
        unfinished = [
            s.label
            for s in studies
            if s.study_instance_uid not in items
            or items[s.study_instance_uid].triage_state not in FINAL_STATES
        ]
        if unfinished:
            print(f"\nnot triaged within {args.timeout:.0f} s: {', '.join(unfinished)}")
        port = node.http.port if node.http else http_port
        print(f"\nWorklist page: http://127.0.0.1:{port}/worklist")
        print(f"Log in with the token: {token}", flush=True)
        if args.exit:
            return 1 if unfinished else 0
        print("The node keeps running; press Ctrl-C to stop.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        node.stop()


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``pacs-triage demo``."""
    demo = commands.add_parser(
        "demo", help="start a node, send generated and real studies, show the triaged worklist"
    )
    demo.add_argument("--data-dir", help="data directory (default: a new temporary one)")
    demo.add_argument(
        "--real-ct",
        help=f"folder of a real CT series (default ${REAL_CT_ENV}, else "
        "../shared/data/ct-pancreas-tcia)",
    )
    demo.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for triage")
    demo.add_argument("--http-port", type=int, default=0, help="HTTP port (default: a free one)")
    demo.add_argument("--dicom-port", type=int, default=0, help="DICOM port (default: a free one)")
    demo.add_argument("--exit", action="store_true", help="stop after printing the worklist")
    demo.add_argument("--verbose", action="store_true", help="log at INFO level")
    demo.set_defaults(func=run)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="pacs-triage")
    add_parser(parser.add_subparsers(dest="command", required=True))
    namespace = parser.parse_args()
    sys.exit(run(namespace))
