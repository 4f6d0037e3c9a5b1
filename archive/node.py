"""The node: one process that owns the DICOM port and runs everything else.

Accepts TCP connections on the DICOM port and hands each to the least busy
DIMSE worker process (:mod:`archive.dimse_worker`) over a Unix socket, so that
several interpreters share one port and every core is used. Brings the index
schema up to date and clears crash leftovers before it accepts anything.
Workers report which studies each association delivers and when it ends; the
node feeds those reports to the study stability monitor, which marks complete
studies ready for triage; the triage dispatcher (:mod:`archive.dispatch`)
runs the triage flow on them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from archive.config import Settings
from archive.db import Database
from archive.dimse_worker import CHANNEL_FD_ENV, SETTINGS_ENV, WORKER_INDEX_ENV
from archive.dispatch import Dispatcher
from archive.http import AppContext, HttpService, TokenBook, create_app, ensure_token_file
from archive.ingest import Ingest
from archive.outbox import DeliveryService
from archive.scp import tune_socket
from archive.stability import DeliveryTracker, StabilityMonitor
from archive.store import FileStore
from archive.triage import release_jobs_of

logger = logging.getLogger(__name__)

AssociationReport = Callable[[dict[str, Any]], None]


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    channel: socket.socket
    active: int = 0
    reader: threading.Thread | None = field(default=None, repr=False)


class DicomService:
    """The DICOM listener and its worker processes.

    Parameters
    ----------
    settings : Settings
        Node settings; ``dicom_host``/``dicom_port`` (0 picks a free port) and
        ``dicom_workers``.
    on_report : callable, optional
        Called (in a node thread) with each worker report about an association
        (see :class:`archive.stability.DeliveryTracker`).
    """

    def __init__(self, settings: Settings, on_report: AssociationReport | None = None) -> None:
        self.settings = settings
        self.on_report = on_report
        self._listener: socket.socket | None = None
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.port = settings.dicom_port

    def start(self) -> None:
        """Bind the DICOM port, start the workers, wait until they are ready, start accepting."""
        family = socket.AF_INET6 if ":" in self.settings.dicom_host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.settings.dicom_host, self.settings.dicom_port))
        listener.listen(128)
        self._listener = listener
        self.port = listener.getsockname()[1]
        for index in range(self.settings.resolved_dicom_workers):
            self._workers.append(self._spawn(index))
        for target, name in ((self._accept_loop, "dicom-acceptor"), (self._watch, "dicom-watch")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info(
            "DICOM service %s listening on %s:%d with %d worker process(es)",
            self.settings.ae_title,
            self.settings.dicom_host,
            self.port,
            len(self._workers),
        )

    def _spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Workers never serve HTTP: they get no tokens (SecretStr would not round-trip).
        worker_settings = self.settings.model_copy(
            update={"dicom_port": self.port, "http_tokens": []}
        )
        env = {
            **os.environ,
            CHANNEL_FD_ENV: str(theirs.fileno()),
            SETTINGS_ENV: worker_settings.model_dump_json(),
            WORKER_INDEX_ENV: str(index),
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "archive.dimse_worker"],
            env=env,
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        worker = _Worker(index, process, ours)
        worker.reader = threading.Thread(
            target=self._read_reports, args=(worker,), name=f"dicom-worker-{index}", daemon=True
        )
        worker.reader.start()
        return worker

    def _read_reports(self, worker: _Worker) -> None:
        with worker.channel.makefile("rb") as lines:
            for line in lines:
                try:
                    report = json.loads(line)
                except ValueError:
                    continue
                if report.get("type") == "closed":
                    with self._lock:
                        worker.active = max(0, worker.active - 1)
                if self.on_report is not None:
                    try:
                        self.on_report(report)
                    except Exception:
                        logger.exception("association report handler failed")

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, address = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                logger.exception("accept failed")
                time.sleep(0.1)
                continue
            tune_socket(conn)
            try:
                self._hand_over(conn, address)
            finally:
                conn.close()  # the worker holds its own copy of the descriptor

    def _hand_over(self, conn: socket.socket, address: tuple[Any, ...]) -> None:
        message = json.dumps([address[0], address[1]]).encode()
        for _ in range(len(self._workers) + 1):
            with self._lock:
                alive = [w for w in self._workers if w.process.poll() is None]
                if not alive:
                    break
                worker = min(alive, key=lambda w: w.active)
                worker.active += 1
            try:
                socket.send_fds(worker.channel, [message], [conn.fileno()])
                return
            except OSError:
                with self._lock:
                    worker.active -= 1
                logger.error("DIMSE worker %d unreachable; trying another", worker.index)
        logger.error("no DIMSE worker available; connection from %s dropped", address[0])

    def _watch(self) -> None:
        """Restart a worker that died (its associations are lost; senders retry)."""
        while not self._stopping.wait(0.5):
            for position, worker in enumerate(list(self._workers)):
                code = worker.process.poll()
                if code is None or self._stopping.is_set():
                    continue
                logger.error("DIMSE worker %d exited with %s; restarting", worker.index, code)
                worker.channel.close()
                with self._lock:
                    self._workers[position] = self._spawn(worker.index)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, stop the workers (they finish nothing in flight)."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        for worker in self._workers:
            worker.process.terminate()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.channel.close()
        self._workers.clear()


class Node:
    """A whole pacs-triage node: index, file store and the services on top of them.

    Parameters
    ----------
    settings : Settings
        The node's settings.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.resolved_database_url, durable=settings.fsync)
        self.file_store = FileStore(settings.data_dir, fsync=settings.fsync)
        self.deliveries = DeliveryTracker()
        self.dicom = DicomService(settings, on_report=self._association_report)
        self.stability = StabilityMonitor(
            self.db,
            self.deliveries,
            quiet_seconds=settings.stable_after_seconds,
            release_quiet_seconds=settings.stable_after_release_seconds,
        )
        self.ingest = Ingest(self.db, self.file_store, settings.duplicate_policy)
        self.http: HttpService | None = None
        self.dispatcher: Dispatcher | None = None
        if settings.triage_enabled:
            self.dispatcher = Dispatcher.for_settings(
                settings, self.db, file_store=self.file_store, ingest=self.ingest
            )
            self.stability.on_ready.append(self.dispatcher.wake)
        self.delivery = DeliveryService(self.db, settings, self.file_store)

    def _association_report(self, report: dict[str, Any]) -> None:
        self.deliveries.report(report)
        if report.get("type") in ("closed", "released"):
            self.stability.wake()

    def start(self) -> None:
        """Migrate the index, clear crash leftovers, start every service."""
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db.upgrade()
        self.file_store.sweep_temporary()
        release_jobs_of(self.db, self.settings.node_name)
        if self.dispatcher is not None:
            self.dispatcher.prepare()  # first: the Prefect server starts while we do
        self.dicom.start()
        self.stability.start()
        ensure_token_file(self.settings)
        self.app_context = AppContext(
            settings=self.settings,
            db=self.db,
            file_store=self.file_store,
            ingest=self.ingest,
            tokens=TokenBook.from_settings(self.settings),
        )
        self.http = HttpService(self.settings, create_app(self.app_context))
        self.http.start()
        if self.dispatcher is not None:
            self.dispatcher.start()
        self.delivery.start()

    def stop(self) -> None:
        """Stop every service and release the index."""
        self.delivery.stop()
        if self.http is not None:
            self.app_context.extras["stopping"] = True
            self.http.stop()
        self.stability.stop()
        if self.dispatcher is not None:
            self.dispatcher.stop()
        self.dicom.stop()
        self.db.dispose()
