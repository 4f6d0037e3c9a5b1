"""``pacs-triage cohort create|list|run|status|export``: research cohorts from the command line.

Accepts the command line and the node's settings (the same index and file
store as the node); produces saved cohorts, runs of the ``run_cohort`` flow
with a progress line (studies done / failed / skipped, rate, ETA), status
reports and result files. Exit status: 0 on success, 1 when a run ended with
failed studies or could not start, 2 for bad input (an unknown model, a bad
CSV row, an empty selection). Holds no logic of its own beyond argument
handling: it calls :mod:`archive.cohorts`, :mod:`archive.remote`,
:mod:`archive.cohort_runner` and :mod:`archive.cohort_export`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from archive.config import Settings

logger = logging.getLogger(__name__)

QUIET_LOGGERS = ("highdicom", "httpx", "prefect", "alembic", "pynetdicom", "dicognito")


def add_parser(commands: Any) -> None:
    """Add the ``cohort`` command and its subcommands to the ``pacs-triage`` parser."""
    cohort = commands.add_parser("cohort", help="research cohorts: select studies, run a model")
    cohort.set_defaults(func=main)
    sub = cohort.add_subparsers(dest="cohort_command", required=True)

    create = sub.add_parser("create", help="save a cohort: its studies and its model")
    create.add_argument("name")
    create.add_argument("--model", required=True, help="model name (NAME or NAME:VERSION)")
    create.add_argument("--model-version", help="model version (default: the active one)")
    source = create.add_mutually_exclusive_group()
    source.add_argument("--csv", type=Path, help="CSV with StudyInstanceUID or AccessionNumber")
    source.add_argument("--remote", metavar="AE_TITLE", help="pull from this remote PACS")
    create.add_argument("--patient-id", action="append", default=[])
    create.add_argument("--accession", action="append", default=[])
    create.add_argument("--date-from", help="Study Date from, YYYYMMDD")
    create.add_argument("--date-to", help="Study Date to, YYYYMMDD")
    create.add_argument("--modality", action="append", default=[])
    create.add_argument("--description", help="Study Description contains this")
    create.add_argument("--body-part", help="a series' Body Part Examined contains this")
    create.add_argument("--analysed-by", metavar="MODEL[:VERSION]")
    create.add_argument("--not-analysed-by", metavar="MODEL[:VERSION]")
    create.add_argument("--limit", type=int)
    sr = create.add_mutually_exclusive_group()
    sr.add_argument("--sr", dest="write_sr", action="store_true", default=None)
    sr.add_argument("--no-sr", dest="write_sr", action="store_false")
    create.set_defaults(cohort_func=_create)

    listing = sub.add_parser("list", help="list the cohorts")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(cohort_func=_list)

    run = sub.add_parser("run", help="run the cohort's model over its pending studies")
    run.add_argument("name")
    run.add_argument("--concurrency", type=int)
    run.add_argument("--max-studies", type=int, help="stop after this many studies")
    run.add_argument("--retry-failed", action="store_true", help="run failed studies again")
    run_sr = run.add_mutually_exclusive_group()
    run_sr.add_argument("--sr", dest="write_sr", action="store_true", default=None)
    run_sr.add_argument("--no-sr", dest="write_sr", action="store_false")
    run.add_argument(
        "--submit",
        action="store_true",
        help="submit to the 'cohort' work queue of the Prefect server (distributed mode)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress line")
    run.set_defaults(cohort_func=_run)

    status = sub.add_parser("status", help="how far a cohort is")
    status.add_argument("name")
    status.add_argument("--json", action="store_true")
    status.add_argument("--failures", action="store_true", help="list failed studies")
    status.set_defaults(cohort_func=_status)

    export = sub.add_parser("export", help="write the results table (CSV or Parquet)")
    export.add_argument("name")
    export.add_argument("--output", "-o", type=Path, required=True, help="FILE.csv or .parquet")
    export.add_argument("--deidentify", action="store_true", help="pseudonyms instead of IDs")
    export.add_argument("--key", help="pseudonym key (default: cohort_pseudonym_key)")
    export.add_argument("--images", type=Path, help="also write de-identified images here")
    export.set_defaults(cohort_func=_export)


def _quiet_libraries() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _open_db(settings: Settings):  # type: ignore[no-untyped-def]
    from archive.db import Database

    db = Database(settings.resolved_database_url, durable=settings.fsync)
    db.upgrade()
    return db


def _fail(message: str, code: int = 2) -> int:
    print(f"pacs-triage cohort: {message}", file=sys.stderr)
    return code


def _query(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from archive.cohorts import StudyQuery

    return StudyQuery(
        patient_ids=tuple(args.patient_id),
        accession_numbers=tuple(args.accession),
        study_date_from=args.date_from,
        study_date_to=args.date_to,
        modalities=tuple(args.modality),
        study_description=args.description,
        body_part=args.body_part,
        analysed_by=args.analysed_by,
        not_analysed_by=args.not_analysed_by,
        limit=args.limit,
    )


def _create(args: argparse.Namespace, settings: Settings) -> int:
    from archive.cohorts import (
        CohortError,
        create_cohort,
        select_from_csv,
        select_studies,
    )
    from archive.remote import RemoteError, pull_studies, remote_by_title
    from models.registry import ModelRegistry, default_model_directories

    name, _, version = args.model.partition(":")
    version = args.model_version or version or None
    registry = ModelRegistry.discover(default_model_directories(settings))
    try:
        model = registry.get(name, version)
    except LookupError as exc:
        return _fail(str(exc))
    db = _open_db(settings)
    try:
        query = _query(args)
        if args.csv is not None:
            try:
                text = args.csv.read_text(encoding="utf-8-sig")
            except OSError as exc:
                return _fail(f"cannot read {args.csv}: {exc.strerror}")
            studies = select_from_csv(db, text)
            selection: dict[str, Any] = {"kind": "csv", "file": args.csv.name}
        elif args.remote:
            remote = remote_by_title(settings.cohort_remotes, args.remote)

            def moved(outcome: Any) -> None:
                print(
                    f"  moved study {outcome.study_instance_uid}: status "
                    f"0x{outcome.status:04X}, {outcome.completed} instance(s)",
                    file=sys.stderr,
                )

            studies, _ = pull_studies(
                db,
                remote,
                query,
                calling_ae_title=settings.ae_title,
                destination_ae_title=settings.ae_title,
                interval_seconds=settings.cohort_move_interval_seconds,
                on_progress=moved,
            )
            selection = {"kind": "remote", "remote": remote.ae_title, "query": query.to_json()}
        else:
            studies = select_studies(db, query)
            selection = {"kind": "query", "query": query.to_json()}
        selection["study_instance_uids"] = [s.study_instance_uid for s in studies]
        info = create_cohort(
            db,
            args.name,
            model_name=model.identity.name,
            model_version=model.identity.version,
            weights_sha256=model.identity.weights_sha256,
            selection=selection,
            studies=studies,
            write_sr=settings.cohort_write_sr if args.write_sr is None else args.write_sr,
        )
    except (CohortError, LookupError, ValueError) as exc:
        return _fail(str(exc))
    except RemoteError as exc:
        return _fail(str(exc), 1)
    finally:
        db.dispose()
    print(f"cohort {info.name}: {info.total} studies, model {info.model_name} {info.model_version}")
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from archive.cohorts import list_cohorts

    db = _open_db(settings)
    try:
        cohorts = list_cohorts(db)
    finally:
        db.dispose()
    if args.json:
        print(json.dumps([c.as_json() for c in cohorts], indent=2))
        return 0
    for c in cohorts:
        print(
            f"{c.name:24} {c.status.value:8} {c.finished:6}/{c.total:<6} "
            f"{c.model_name} {c.model_version}  created {c.created_at:%Y-%m-%d %H:%M}"
        )
    return 0


def format_progress(counts: dict[str, int], total: int, rate: float | None) -> str:
    """One progress line: bar, counts per status, studies per second and the time left."""
    done = counts.get("done", 0)
    failed = counts.get("failed", 0)
    skipped = counts.get("skipped", 0)
    finished = done + failed + skipped
    width = 24
    filled = int(width * finished / total) if total else width
    line = (
        f"[{'#' * filled}{'.' * (width - filled)}] {finished}/{total} "
        f"done {done} failed {failed} skipped {skipped}"
    )
    if rate:
        remaining = (total - finished) / rate
        minutes, seconds = divmod(int(remaining), 60)
        line += f" | {rate * 3600:.0f} studies/h | ETA {minutes}m{seconds:02d}s"
    return line


class Progress:
    """Prints the cohort's progress every `interval` seconds from a thread (stderr)."""

    def __init__(
        self, settings: Settings, name: str, stream: TextIO = sys.stderr, interval: float = 1.0
    ) -> None:
        self.db = _open_db(settings)
        self.name = name
        self.stream = stream
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cohort-progress", daemon=True)
        self._tty = stream.isatty()

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._print(final=True)
        self.db.dispose()

    def _loop(self) -> None:
        self._start = time.monotonic()
        self._first: int | None = None
        ticks = 0
        while not self._stop.wait(self.interval):
            ticks += 1
            if self._tty or ticks % 5 == 0:
                self._print()

    def _print(self, final: bool = False) -> None:
        from archive.cohorts import get_cohort

        try:
            info = get_cohort(self.db, self.name)
        except Exception:
            return
        if self._first is None:
            self._first = info.finished
        elapsed = time.monotonic() - self._start
        done_now = info.finished - self._first
        rate = done_now / elapsed if elapsed > 0 and done_now > 0 else None
        line = format_progress(info.counts, info.total, rate)
        end = "\n" if final or not self._tty else ""
        self.stream.write(("\r" if self._tty else "") + line + end)
        self.stream.flush()


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from archive import cohort_runner
    from archive.cohorts import CohortError, get_cohort, reopen_failed

    db = _open_db(settings)
    try:
        info = get_cohort(db, args.name)
        if args.retry_failed:
            print(f"{reopen_failed(db, info.id)} failed studies put back", file=sys.stderr)
    except LookupError as exc:
        return _fail(str(exc))
    finally:
        db.dispose()
    if args.submit and not settings.resolved_prefect_api_url:
        return _fail("--submit needs a Prefect server (PREFECT_API_URL or prefect_api_url)")
    with cohort_runner.prefect_api(settings) as api_url:
        _quiet_libraries()
        if args.submit:
            run_id = cohort_runner.submit(
                settings, args.name, concurrency=args.concurrency, write_sr=args.write_sr
            )
            print(
                f"cohort {args.name}: submitted flow run {run_id} to the cohort queue ({api_url})"
            )
            return 0
        progress: Any = Progress(settings, args.name) if not args.quiet else _NoProgress()
        try:
            with progress:
                summary = cohort_runner.run_here(
                    settings,
                    args.name,
                    concurrency=args.concurrency,
                    write_sr=args.write_sr,
                    max_studies=args.max_studies,
                )
        except CohortError as exc:
            return _fail(str(exc), 1)
    print(json.dumps(summary))
    return 1 if summary["counts"].get("failed") else 0


class _NoProgress:
    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select

    from archive.cohorts import CohortItem, CohortItemStatusValues, get_cohort

    db = _open_db(settings)
    try:
        info = get_cohort(db, args.name)
        failures = []
        if args.failures:
            with db.reader() as session:
                failures = [
                    {"StudyInstanceUID": uid, "error": error}
                    for uid, error in session.execute(
                        select(CohortItem.study_instance_uid, CohortItem.error)
                        .where(
                            CohortItem.cohort_id == info.id,
                            CohortItem.status == CohortItemStatusValues.FAILED.value,
                        )
                        .order_by(CohortItem.position)
                    )
                ]
    except LookupError as exc:
        return _fail(str(exc))
    finally:
        db.dispose()
    if args.json:
        out = info.as_json()
        if args.failures:
            out["failures"] = failures
        print(json.dumps(out, indent=2))
        return 0
    print(f"cohort {info.name} ({info.status.value}): model {info.model_name} {info.model_version}")
    print(format_progress(info.counts, info.total, None))
    for failure in failures:
        print(f"  failed {failure['StudyInstanceUID']}: {failure['error']}")
    return 0


def _export(args: argparse.Namespace, settings: Settings) -> int:
    from archive.cohort_export import Pseudonymizer, export_images, results_rows, write_results
    from archive.store import FileStore

    pseudonymizer = None
    if args.deidentify or args.images:
        key = args.key or (
            settings.cohort_pseudonym_key.get_secret_value()
            if settings.cohort_pseudonym_key
            else None
        )
        if not key:
            return _fail("de-identified export needs --key or cohort_pseudonym_key")
        try:
            pseudonymizer = Pseudonymizer(key)
        except ValueError as exc:
            return _fail(str(exc))
    db = _open_db(settings)
    try:
        rows = results_rows(db, args.name)
        if pseudonymizer is not None and args.deidentify:
            rows = pseudonymizer.rows(rows)
        path = write_results(rows, args.output)
        images = 0
        if args.images:
            images = export_images(
                db,
                FileStore(settings.data_dir, fsync=False),
                args.name,
                args.images,
                pseudonymizer,  # type: ignore[arg-type]
            )
    except (LookupError, ValueError) as exc:
        return _fail(str(exc))
    finally:
        db.dispose()
    print(
        f"cohort {args.name}: {len(rows)} result rows written to {path}"
        + (f", {images} de-identified instances to {args.images}" if args.images else "")
    )
    return 0


def main(args: argparse.Namespace) -> int:
    """Run the ``cohort`` subcommand chosen in `args`."""
    from archive.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level)
    _quiet_libraries()
    return int(args.cohort_func(args, settings))
