"""Ingest rate: storescu -> pacs-triage vs Orthanc vs dcmtk storescp, in one run.

Sends N CT-sized instances (the real 512x512 CT series, with fresh UIDs when N
exceeds its 134 slices) over 1 and 4 concurrent associations with dcmtk's
storescu, as a modality would (stock settings: no TCP_NODELAY in the sender's
environment), into:

- pacs-triage (``pacs-triage serve``, SQLite index, durable: fsync on),
- Orthanc from the Debian package (SQLite index, no compression),
- dcmtk storescp (``--fork`` for concurrent associations; writes files, no index).

Each target starts empty for each run. Prints instances/s and MB/s, and our
ratio to each peer, twice: with stock programs, and with ``TCP_NODELAY=1`` in
the environment of dcmtk and Orthanc (which makes them turn Nagle off; our
node turns it off itself and is not given the variable).

Usage: ``python benchmarks/ingest.py [--instances N] [--repeat R]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom
from pydicom.uid import generate_uid

from tests.peers import (
    CT_SERIES_DIR,
    NodeProcess,
    OrthancPeer,
    StoreSCP,
    hardware,
    storescu_parallel,
)


def prepare_instances(count: int, workdir: Path) -> list[Path]:
    """`count` CT instances: the real series, then copies with new UIDs."""
    sources = sorted(CT_SERIES_DIR.glob("*.dcm"))
    if not sources:
        raise SystemExit(f"CT series not found in {CT_SERIES_DIR}")
    if count <= len(sources):
        return sources[:count]
    files = list(sources)
    study_uid = generate_uid()
    series_uid = generate_uid()
    for i in range(count - len(sources)):
        ds = pydicom.dcmread(sources[i % len(sources)])
        if i % len(sources) == 0:
            series_uid = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = workdir / f"extra-{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def send(
    port: int, files: list[Path], associations: int, called: str, env: dict[str, str]
) -> float:
    """Send `files` split over `associations` storescu processes; return seconds."""
    groups = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    senders = storescu_parallel(port, groups, called=called, env=env)
    failures = []
    for proc in senders:
        _, stderr = proc.communicate()
        if proc.returncode != 0:
            failures.append(stderr.decode(errors="replace")[-400:])
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError("storescu failed:\n" + "\n".join(failures))
    return elapsed


@contextmanager
def pacs_triage(workdir: Path, env: dict[str, str]) -> Iterator[tuple[int, str]]:
    clean = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    with NodeProcess(workdir / "node", env=clean) as node:
        yield node.dicom_port, "PACS_TRIAGE"


@contextmanager
def orthanc(workdir: Path, env: dict[str, str]) -> Iterator[tuple[int, str]]:
    with OrthancPeer(env=env) as peer:
        yield peer.dicom_port, peer.ae_title


@contextmanager
def storescp(workdir: Path, env: dict[str, str]) -> Iterator[tuple[int, str]]:
    with StoreSCP(workdir / "storescp", fork=True, env=env) as peer:
        yield peer.port, peer.ae_title


TARGETS: dict[str, Callable[[Path, dict[str, str]], object]] = {
    "pacs-triage": pacs_triage,
    "orthanc": orthanc,
    "storescp": storescp,
}


def run_mode(
    args: argparse.Namespace,
    files: list[Path],
    megabytes: float,
    workroot: Path,
    env: dict[str, str],
) -> None:
    results: dict[tuple[str, int], float] = {}
    for associations in args.associations:
        for name in args.targets:
            rates = []
            for run in range(args.repeat):
                runroot = workroot / f"{name}-{associations}-{run}"
                runroot.mkdir(parents=True)
                with TARGETS[name](runroot, env) as (port, called):  # type: ignore[attr-defined]
                    seconds = send(port, files, associations, called, env)
                rates.append(len(files) / seconds)
                shutil.rmtree(runroot, ignore_errors=True)
            rate = statistics.median(rates)
            results[(name, associations)] = rate
            print(
                f"{name:12s} {associations} assoc: {rate:7.1f} instances/s "
                f"{rate * megabytes / len(files):6.1f} MB/s  (runs: "
                + ", ".join(f"{r:.0f}" for r in rates)
                + ")",
                flush=True,
            )
    for associations in args.associations:
        ours = results.get(("pacs-triage", associations))
        if ours is None:
            continue
        for peer in ("orthanc", "storescp"):
            theirs = results.get((peer, associations))
            if theirs:
                print(f"ratio pacs-triage / {peer} at {associations} assoc: {ours / theirs:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument(
        "--modes", nargs="+", default=["stock", "nodelay"], choices=["stock", "nodelay"]
    )
    args = parser.parse_args()

    print(hardware())
    workroot = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        files = prepare_instances(args.instances, workroot)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        print(f"{len(files)} instances, {megabytes:.1f} MB, {args.repeat} runs per cell (median)")
        for mode in args.modes:
            env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
            if mode == "nodelay":
                env["TCP_NODELAY"] = "1"
            print(f"\n== {mode}: TCP_NODELAY {'set' if mode == 'nodelay' else 'unset'} for peers")
            run_mode(args, files, megabytes, workroot / mode, env)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)


if __name__ == "__main__":
    main()
