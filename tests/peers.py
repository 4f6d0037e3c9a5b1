"""Real DICOM peers for tests and benchmarks: a pacs-triage node process, Orthanc, dcmtk.

Each peer is a context manager that starts the real program on loopback with
its own temporary configuration, waits until it answers, and stops it on exit.
Used by tests/ and benchmarks/ alike (benchmarks import it as ``tests.peers``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    """The real DICOM data: ``$PACS_TRIAGE_SHARED_DATA``, ../shared/data, or /work/shared/data."""
    candidates = [
        os.environ.get("PACS_TRIAGE_SHARED_DATA"),
        REPO_ROOT.parent / "shared" / "data",
        "/work/shared/data",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return REPO_ROOT.parent / "shared" / "data"


SHARED_DATA = _shared_data()
CT_SERIES_DIR = SHARED_DATA / "ct-pancreas-tcia"
TRANSFER_SYNTAX_DIR = SHARED_DATA / "transfer-syntaxes"

# storescu's option that proposes a file's (compressed) transfer syntax, by TS UID.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.2": "-xb",
}


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def hardware() -> str:
    """The machine a benchmark ran on, for its printout (host, CPUs, Python)."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} x {cpu}, Python {platform.python_version()}"


def wait_for_port(
    port: int, timeout: float = 30.0, process: subprocess.Popen | None = None
) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def echoscu(port: int, called: str = "ANY-SCP", calling: str = "ECHOSCU") -> int:
    """Run dcmtk's echoscu; return its exit status."""
    return subprocess.run(
        ["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True,
        check=False,
    ).returncode


def storescu(
    port: int,
    files: Sequence[Path | str],
    *,
    called: str = "ANY-SCP",
    calling: str = "STORESCU",
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk's storescu (one association), as a modality would."""
    return subprocess.run(
        ["storescu", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


def storescu_parallel(
    port: int,
    groups: Iterable[Sequence[Path]],
    *,
    called: str = "ANY-SCP",
    env: dict[str, str] | None = None,
) -> list[subprocess.Popen[bytes]]:
    """Start one storescu process per group of files (concurrent associations)."""
    return [
        subprocess.Popen(
            ["storescu", "-aet", f"SENDER{i}", "-aec", called, "127.0.0.1", str(port)]
            + [str(f) for f in group],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        for i, group in enumerate(groups)
    ]


class NodeProcess:
    """A ``pacs-triage serve`` process with its own data directory and ports."""

    def __init__(
        self,
        data_dir: Path,
        *,
        env: dict[str, str] | None = None,
        dicom_port: int | None = None,
        http_port: int | None = None,
        triage: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.token = secrets.token_urlsafe(24)
        """An admin bearer token for this node's HTTP API."""
        self.env = {
            **os.environ,
            "PACS_TRIAGE_HTTP_TOKENS": json.dumps(
                [{"name": "test", "token": self.token, "scopes": ["admin"]}]
            ),
            # Triage (and its Prefect server) only where a test asks for it.
            "PACS_TRIAGE_TRIAGE_ENABLED": "true" if triage else "false",
            "PACS_TRIAGE_DATA_DIR": str(self.data_dir),
            "PACS_TRIAGE_DICOM_HOST": "127.0.0.1",
            "PACS_TRIAGE_DICOM_PORT": str(self.dicom_port),
            "PACS_TRIAGE_HTTP_PORT": str(self.http_port),
            "PYTHONPATH": str(REPO_ROOT),
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"

    def start(self, timeout: float = 60.0) -> NodeProcess:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "archive.cli", "serve"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(REPO_ROOT),
        )
        wait_for_port(self.dicom_port, timeout, self.process)
        deadline = time.monotonic() + timeout
        while echoscu(self.dicom_port) != 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"node did not answer C-ECHO; log: {self.log_path}")
            time.sleep(0.1)
        wait_for_port(self.http_port, timeout, self.process)
        return self

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def kill(self) -> None:
        """SIGKILL the node and its workers (the whole process group), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process is not None:
            # Reap the worker group if anything is left.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class OrthancPeer:
    """Orthanc (Debian package) on loopback with a throwaway configuration.

    Parameters
    ----------
    modalities : dict
        Known DICOM peers, ``{name: (ae_title, host, port)}``, for C-MOVE and C-STORE.
    extra_config : dict
        Further Orthanc configuration keys.
    """

    def __init__(
        self,
        *,
        ae_title: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        extra_config: dict[str, object] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.env = env
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.modalities = modalities or {}
        self.extra_config = extra_config or {}
        self.workdir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> OrthancPeer:
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        self.workdir = Path(tempfile.mkdtemp(prefix="orthanc-"))
        config = {
            "Name": "pacs-triage-peer",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowEcho": True,
            "StorageCompression": False,
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            "Plugins": [],
            **self.extra_config,
        }
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config))
        self.process = subprocess.Popen(
            [binary, str(config_path)],
            stdout=(self.workdir / "orthanc.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=self.env,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/system", timeout=1) as response:
                    json.load(response)
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "Orthanc did not start: " + (self.workdir / "orthanc.log").read_text()
                    ) from None
                time.sleep(0.1)
        wait_for_port(self.dicom_port, timeout, self.process)
        return self

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return json.load(response)

    def post(self, path: str, body: object) -> object:
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=json.dumps(body).encode() if not isinstance(body, bytes) else body,
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> OrthancPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class StoreSCP:
    """dcmtk's storescp writing into a directory (a plain storage peer)."""

    def __init__(
        self,
        output_dir: Path,
        *,
        ae_title: str = "STORESCP",
        fork: bool = False,
        env: dict[str, str] | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.env = env
        self.extra = list(extra)
        """Further storescp options, e.g. ``+B`` to write received data sets bit for bit."""
        self.output_dir = Path(output_dir)
        self.ae_title = ae_title
        self.port = free_port()
        self.fork = fork
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        args = ["storescp", "-aet", self.ae_title, "-od", str(self.output_dir), "+xa"]
        if self.fork:
            args.append("--fork")
        args += self.extra
        self.process = subprocess.Popen(
            [*args, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=self.env,
        )
        wait_for_port(self.port, 30, self.process)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(10)

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
