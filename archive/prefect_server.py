"""A managed ``prefect server start`` child process for the embedded node.

Prefect 3 with no API URL starts a temporary server in every process that
runs its first flow (13-34 s on this 2-core machine). A node must not pay
that per study, so in embedded mode the node starts one Prefect server as a
child process when it starts (home under ``<data_dir>/prefect``, analytics
off, no UI, no scheduler), waits until its health endpoint answers, and points
this process's Prefect client at it. Accepts the node's settings; produces
an API URL; never runs a flow itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_SECONDS = 180.0

QUIET_ENV = {
    # Offline, the server looks up a telemetry host at start and every 10 minutes.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_UI_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    # Nothing is scheduled in embedded mode: these services would only burn CPU.
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(int(STARTUP_TIMEOUT_SECONDS)),
    "PREFECT_API_SERVICES_TRIGGERS_ENABLED": "false",
}
"""Environment of the managed server (and of the node's own Prefect client)."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the server gets SIGTERM when the node dies, even by SIGKILL (prctl PDEATHSIG)."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def use_api(api_url: str, home: Path | None = None) -> None:
    """Point this process's Prefect client at `api_url` (also if prefect is already imported)."""
    os.environ["PREFECT_API_URL"] = api_url
    if home is not None:
        os.environ["PREFECT_HOME"] = str(home)
    for key in ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK"):
        os.environ.setdefault(key, QUIET_ENV[key])
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True if the Prefect API at `api_url` answers its health check."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as rsp:
            return bool(json.load(rsp))
    except (OSError, ValueError):
        return False


def drain_prefect_client(timeout: float = 5.0) -> None:
    """Send this process's queued Prefect logs and events now (before the server goes away).

    Without it, the client retries against a stopped server at interpreter exit.
    """
    if "prefect.logging.handlers" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


class ManagedPrefectServer:
    """One ``prefect server start`` child, started once, stopped with the node.

    Parameters
    ----------
    home : Path
        PREFECT_HOME of the server (its SQLite database lives there).
    host : str
        Interface to bind (loopback: only this node uses it).
    port : int
        0 picks a free port.
    """

    def __init__(self, home: Path, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.home = Path(home)
        self.host = host
        self.port = port or _free_port(host)
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = threading.Event()
        self.error: str | None = None
        self.log_path = self.home / "server.log"

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    def environment(self) -> dict[str, str]:
        env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(self.home)}
        env.pop("PREFECT_API_URL", None)
        return env

    def start(self) -> None:
        """Start the server process (returns at once; :meth:`wait` waits for it)."""
        self.home.mkdir(parents=True, exist_ok=True)
        prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                prefect,
                "server",
                "start",
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--no-ui",
                "--analytics-off",
                "--no-scheduler",
                "--no-late-runs",
            ],
            env=self.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(self.home),
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        log.close()
        logger.info("starting Prefect server on %s (home %s)", self.api_url, self.home)

    def wait(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> bool:
        """Wait until the API answers; False (and :attr:`error` set) if it never does."""
        if self.ready.is_set():
            return True
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                self.error = f"Prefect server exited with {code}; log: {self.log_path}"
                logger.error("%s", self.error)
                return False
            if api_healthy(self.api_url, timeout=1.0):
                logger.info(
                    "Prefect server ready on %s after %.1f s",
                    self.api_url,
                    time.monotonic() - started,
                )
                self.ready.set()
                return True
            time.sleep(0.2)
        self.error = f"Prefect server not ready after {timeout:.0f} s; log: {self.log_path}"
        logger.error("%s", self.error)
        return False

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        drain_prefect_client()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
