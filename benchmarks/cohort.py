"""Cohort throughput, pipeline overhead and clinical time-to-triage while a cohort runs.

Fills a throwaway archive with synthetic head CT studies (``models.phantoms``),
then measures, in one run on this machine:

1. **peer**: a bare loop over the same studies (read the files with pydicom,
   build the volume, ``model.predict``), no Prefect, no index, one torch
   thread: what the work costs without the pipeline;
2. **cohort**: ``pacs-triage cohort run`` (the ``run_cohort`` flow against a
   real Prefect server, index bookkeeping, result table, research SRs with
   ``--sr``) in a child process: studies per hour, and the pipeline's overhead
   (wall time less the model time) as a share of the pure model time (the sum
   of ``model.predict`` times it recorded; also against the bare loop's
   ``model.predict`` times, measured with nothing running beside them);
3. **lane**: the time-to-triage of a clinical study through the real outbox
   and the real ``triage_study`` flow, once with nothing else running
   (baseline) and once arriving while the cohort runs.

Usage::

    python benchmarks/cohort.py [--studies 500] [--slices 16] [--rows 64]
                                [--spatial-size 64] [--concurrency 1] [--sr]
    python benchmarks/cohort.py --models-dir models/bundles --model ich_ct_demo

The model is a real MONAI bundle written by ``models.testing.make_bundle``
(kind ``intensity``, input resized to ``--spatial-size`` cubed, a few ms per
study); pass ``--models-dir DIR --model NAME[:VERSION]`` to measure an
installed bundle instead (the shipped ``ich_ct_demo`` is the realistic case).
Prints the numbers and the hardware; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from sqlalchemy import func, select  # noqa: E402

from archive.cohorts import CohortItem, StudyQuery, create_cohort, select_studies  # noqa: E402
from archive.index import Instance, Series, Study, StudyTriage, TriageJob  # noqa: E402
from archive.triage import mark_ready, stable_candidates  # noqa: E402
from tests import peers  # noqa: E402
from tests.flows.cohort_support import Archive, cli  # noqa: E402


def hardware() -> str:
    """The machine, plus torch's version and default thread count."""
    import torch

    return (
        f"{peers.hardware()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads by default)"
    )


def bare_loop(archive: Archive, model, study_pks: list[int]) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """The peer: files -> volume -> predict per study; returns (wall, sum of predict times)."""
    import pydicom
    import torch

    from pipeline.volume import volume_from_datasets

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with archive.db.reader() as session:
        rows = session.execute(
            select(Series.study_pk, Instance.path)
            .join(Instance, Instance.series_pk == Series.id)
            .where(Series.study_pk.in_(study_pks), Series.modality != "SR")
            .order_by(Series.study_pk, Instance.instance_number)
        ).all()
    by_study: dict[int, list[str]] = {}
    for study_pk, path in rows:
        by_study.setdefault(study_pk, []).append(path)
    predict = 0.0
    started = time.perf_counter()
    for paths in by_study.values():
        datasets = [pydicom.dcmread(archive.file_store.absolute(p)) for p in paths]
        volume = volume_from_datasets(datasets)
        step = time.perf_counter()
        model.predict(volume)
        predict += time.perf_counter() - step
    wall = time.perf_counter() - started
    torch.set_num_threads(threads)
    return wall, predict


class Triage:
    """Clinical triage in this process: the real dispatcher and triage flow."""

    def __init__(self, archive: Archive, api_url: str) -> None:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from archive.dispatch import Dispatcher
        from flows.triage import triage_study

        def run(job) -> None:  # type: ignore[no-untyped-def]
            with temporary_settings(updates={PREFECT_API_URL: api_url}):
                asyncio.run(triage_study(job.id))

        self.archive = archive
        self.dispatcher = Dispatcher(archive.settings, archive.db, run, poll_seconds=0.2)
        self.dispatcher.start()

    def time_to_triage(self, study_instance_uid: str, timeout: float = 300) -> float:
        db = self.archive.db
        candidate = next(
            c
            for c in stable_candidates(db, since=None)
            if c.study_instance_uid == study_instance_uid
        )
        ready = time.perf_counter()
        mark_ready(db, candidate)
        self.dispatcher.wake()
        deadline = ready + timeout
        while time.perf_counter() < deadline:
            with db.reader() as session:
                state = session.scalar(
                    select(StudyTriage.state)
                    .join(Study, Study.id == StudyTriage.study_pk)
                    .where(Study.study_instance_uid == study_instance_uid)
                )
            if state in ("triaged", "failed", "no_applicable_model"):
                if state != "triaged":
                    print(f"  warning: clinical study ended {state}")
                return time.perf_counter() - ready
            time.sleep(0.02)
        raise TimeoutError("clinical study not triaged")

    def stop(self) -> None:
        self.dispatcher.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=500)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--spatial-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument(
        "--sr",
        action="store_true",
        help="cohort with research SRs (off by default, as in the product)",
    )
    parser.add_argument(
        "--shared-server",
        action="store_true",
        help="the cohort run reports to the triage flows' Prefect server (default: its own "
        "managed server, as 'pacs-triage cohort run' does in embedded mode)",
    )
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--model", help="NAME[:VERSION] of a bundle in --models-dir")
    parser.add_argument("--keep", action="store_true", help="keep the temporary archive")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    from models.registry import ModelRegistry
    from models.testing import make_bundle

    print(f"hardware: {hardware()}")
    root = Path(tempfile.mkdtemp(prefix="pacs-triage-cohort-bench-"))
    try:
        models_dir = args.models_dir or root / "models"
        if args.model:
            name, _, version = args.model.partition(":")
        else:
            name, version = "bench-intensity", "1.0"
            size = args.spatial_size
            make_bundle(
                models_dir,
                name=name,
                version=version,
                kind="intensity",
                spatial_size=(size, size, size),
            )
        archive = Archive.create(root / "data", models_dirs=[models_dir])
        registry = ModelRegistry.discover([models_dir])
        model = registry.get(name, version or None)
        print(
            f"model: {model.name} {model.version}; studies: {args.studies} synthetic head CTs of "
            f"{args.slices} x {args.rows} x {args.rows} voxels"
        )

        started = time.perf_counter()
        work = root / "phantoms"
        for seed in range(args.studies):
            archive.add_phantom(
                work, seed, positive=seed % 5 == 0, slices=args.slices, rows=args.rows
            )
            shutil.rmtree(work / f"phantom-{seed}", ignore_errors=True)
        clinical = [
            archive.add_phantom(
                work, 900_000 + k, positive=True, slices=args.slices, rows=args.rows
            )
            for k in range(3)
        ]
        print(f"archive filled in {time.perf_counter() - started:.1f} s")
        studies = [
            s
            for s in select_studies(archive.db, StudyQuery())
            if s.study_instance_uid not in clinical
        ]

        # 1. The peer: a bare loop over the same studies.
        model.predict  # noqa: B018 - loaded lazily; warm it up on one study first
        bare_loop(archive, model, [studies[0].study_pk])
        bare_wall, bare_predict = bare_loop(archive, model, [s.study_pk for s in studies])
        print(
            f"peer (bare loop, 1 torch thread): {bare_wall:.1f} s, "
            f"{len(studies) / bare_wall * 3600:.0f} studies/h; model {bare_predict:.1f} s, "
            f"loading and decoding {bare_wall - bare_predict:.1f} s"
        )

        from archive.prefect_server import ManagedPrefectServer
        from flows import runtime

        server = ManagedPrefectServer(root / "prefect")
        server.start()
        if not server.wait():
            print(f"Prefect server did not start: {server.error}")
            return 1
        runtime.configure(
            runtime.TriageRuntime(
                settings=archive.settings,
                db=archive.db,
                file_store=archive.file_store,
                ingest=archive.ingest,
                registry=registry,
            )
        )
        triage = Triage(archive, server.api_url)
        try:
            cold = triage.time_to_triage(clinical[0])
            baseline = triage.time_to_triage(clinical[1])
            print(
                f"clinical time-to-triage, idle node: {baseline:.2f} s (first, cold: {cold:.2f} s)"
            )

            create_cohort(
                archive.db,
                "bench",
                model_name=model.name,
                model_version=model.version,
                weights_sha256=model.identity.weights_sha256,
                selection={"kind": "benchmark"},
                studies=studies,
                write_sr=args.sr,
            )
            env = archive.env(PREFECT_API_URL=server.api_url)
            if not args.shared_server:
                env.pop("PREFECT_API_URL")
            run = subprocess.Popen(
                [*cli("cohort", "run", "bench", "--quiet"), "--concurrency", str(args.concurrency)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            output: list[str] = []
            reader = threading.Thread(target=lambda: output.extend(run.stdout or []), daemon=True)
            reader.start()

            def done() -> int:
                with archive.db.reader() as session:
                    return int(
                        session.scalar(
                            select(func.count()).where(CohortItem.status.in_(["done", "failed"]))
                        )
                    )

            while done() < len(studies) * 0.3 and run.poll() is None:  # (own server starts)
                time.sleep(0.2)
            during = triage.time_to_triage(clinical[2])
            at = done()
            run.wait()
            reader.join(10)
        finally:
            triage.stop()
            server.stop()

        summary = json.loads(output[-1]) if output else {}
        if run.returncode not in (0, 1) or not summary:
            print("cohort run failed:\n" + "".join(output[-30:]))
            return 1
        with archive.db.reader() as session:
            row = session.execute(
                select(
                    func.sum(CohortItem.inference_seconds),
                    func.sum(CohortItem.load_seconds),
                    func.count(),
                )
            ).one()
            jobs = session.execute(select(TriageJob.created_at, TriageJob.finished_at)).all()
        inference, loading, count = float(row[0] or 0), float(row[1] or 0), row[2]
        wall = float(summary["seconds"]) - float(summary["yield_seconds"])
        rate = count / summary["seconds"] * 3600
        overhead = wall - inference
        print(
            f"cohort run (run_cohort flow, {'shared' if args.shared_server else 'own'} Prefect "
            f"server, concurrency {args.concurrency}, "
            f"research SRs {'on' if args.sr else 'off'}): "
            f"{summary['seconds']:.1f} s for {count} studies = {rate:.0f} studies/h "
            f"({summary['counts']}); yielded {summary['yield_seconds']:.1f} s to triage"
        )
        n = max(count, 1)
        print(
            f"  pure model time {inference:.1f} s ({inference / n * 1000:.1f} ms/study; the "
            f"bare loop's: {bare_predict / len(studies) * 1000:.1f} ms/study); reading "
            f"{loading:.1f} s (in a thread, while the model runs on the study before)"
        )
        print(
            f"  pipeline overhead {overhead:.1f} s = {overhead / n * 1000:.1f} ms/study = "
            f"{overhead / inference:.0%} of pure model time (bar: < 10%); vs the bare loop: "
            f"{wall / bare_wall:.2f}x its wall time, overhead beyond the peer "
            f"{(wall - bare_wall) / bare_predict:+.0%} of model time"
        )
        print(
            f"  (against the bare loop's model time, measured alone: wall - model = "
            f"{wall - bare_predict:.1f} s = {(wall - bare_predict) / bare_predict:.0%}; "
            f"the bare loop's own reading costs {(bare_wall - bare_predict) / bare_predict:.0%})"
        )
        print(
            f"clinical time-to-triage while the cohort ran (at {at}/{count}): {during:.2f} s "
            f"= {during / baseline:.2f}x the idle baseline ({len(jobs)} triage jobs)"
        )
    finally:
        if args.keep:
            print(f"archive kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
