"""A DIMSE worker process: serves associations on sockets handed over by the node.

Run by :class:`archive.node.DicomService`, never by hand. Receives accepted TCP
connections over a Unix socket (``SCM_RIGHTS``), runs each association in a
thread of this process with the node's handlers, and reports back on the same
Unix socket, one JSON line per closed association (which studies it delivered).
Several workers share one port, so the node uses every core.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import threading

from pydicom import config as pydicom_config

from archive.config import Settings
from archive.db import Database
from archive.ingest import Ingest
from archive.logs import configure_logging
from archive.scp import build_ae, make_handoff_server
from archive.store import FileStore

logger = logging.getLogger(__name__)

CHANNEL_FD_ENV = "PACS_TRIAGE_WORKER_FD"
SETTINGS_ENV = "PACS_TRIAGE_WORKER_SETTINGS"
WORKER_INDEX_ENV = "PACS_TRIAGE_WORKER_INDEX"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the node process dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class Channel:
    """The worker's end of the Unix socket to the node."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def report(self, message: dict[str, object]) -> None:
        line = (json.dumps(message) + "\n").encode()
        # A failed send means the node is gone, and we die with it.
        with self._lock, contextlib.suppress(OSError):
            self.sock.sendall(line)

    def receive_connection(self) -> tuple[socket.socket, tuple[str, int]] | None:
        message, fds, _flags, _address = socket.recv_fds(self.sock, 1024, 1)
        if not message:
            for fd in fds:
                os.close(fd)
            return None
        host, port = json.loads(message)
        return socket.socket(fileno=fds[0]), (host, port)


def main() -> None:
    _die_with_parent()
    settings = Settings.model_validate_json(os.environ[SETTINGS_ENV])
    configure_logging(settings.log_level)
    # Values are validated where we use them; pydicom's per-element validation on
    # every command set costs more than it catches here.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE

    channel = Channel(socket.socket(fileno=int(os.environ[CHANNEL_FD_ENV])))
    db = Database(settings.resolved_database_url, durable=settings.fsync)
    ingest = Ingest(
        db, FileStore(settings.data_dir, fsync=settings.fsync), settings.duplicate_policy
    )
    ae = build_ae(settings)
    server = make_handoff_server(ae, settings, ingest, on_report=channel.report)
    logger.info("DIMSE worker %s ready", os.environ.get(WORKER_INDEX_ENV, "?"))
    while True:
        try:
            received = channel.receive_connection()
        except OSError:
            received = None
        if received is None:
            break
        sock, address = received
        server.serve_connection(sock, address)
    db.dispose()
    sys.exit(0)


if __name__ == "__main__":
    main()
