"""Database handle: engines, sessions and schema migration for the index.

One :class:`Database` per process. SQLite (the embedded default) runs in WAL
mode with ``synchronous=FULL`` so that a committed row survives a crash, and
write transactions start with ``BEGIN IMMEDIATE`` behind an flock, so that
several node processes writing at once queue without failing or sleeping. PostgreSQL
is used as is, by URL.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 60_000


class _WriterLock:
    """Serialises SQLite writers across the node's processes and threads.

    SQLite's own busy handler waits by sleeping 1, 2, 5, 10... ms between
    retries, so writers from several processes queue behind sleeps even when
    the lock is free again after 2 ms. An flock wakes the next writer at once.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid = -1

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            if self._fd is None or self._pid != os.getpid():
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
                self._pid = os.getpid()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            assert self._fd is not None
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_engine(url: str, *, immediate: bool, synchronous: str) -> Engine:
    engine = create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A deferred transaction that later writes can fail with SQLITE_BUSY without
        # waiting; writers therefore take the write lock up front.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def upsert_insert(dialect: str):  # type: ignore[no-untyped-def]
    """The INSERT construct of `dialect` with ON CONFLICT support (PostgreSQL or SQLite)."""
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


class Database:
    """Engines and session factories for one index URL.

    Parameters
    ----------
    url : str
        SQLAlchemy URL, e.g. ``sqlite:////var/lib/pacs-triage/index.sqlite`` or
        ``postgresql+psycopg://user@host/db``.
    durable : bool
        For SQLite, ``synchronous=FULL`` (True) or ``NORMAL`` (False).
    """

    def __init__(self, url: str, *, durable: bool = True) -> None:
        self.url = url
        self.is_sqlite = _is_sqlite(url)
        self._write_lock: _WriterLock | None = None
        if self.is_sqlite:
            if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
                path = Path(url.removeprefix("sqlite:///"))
                path.parent.mkdir(parents=True, exist_ok=True)
                self._write_lock = _WriterLock(path.with_name(path.name + ".writelock"))
            synchronous = "FULL" if durable else "NORMAL"
            self.write_engine = _sqlite_engine(url, immediate=True, synchronous=synchronous)
            self.read_engine = _sqlite_engine(url, immediate=False, synchronous=synchronous)
        else:
            self.write_engine = create_engine(url, pool_pre_ping=True)
            self.read_engine = self.write_engine
        self._writer = sessionmaker(self.write_engine, expire_on_commit=False)
        self._reader = sessionmaker(self.read_engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.write_engine.dialect.name

    @contextmanager
    def writer(self) -> Iterator[Session]:
        """A session for one write transaction: committed on success, rolled back on error."""
        with self._serialized(), self._writer() as session, session.begin():
            yield session

    @contextmanager
    def write_connection(self) -> Iterator[Connection]:
        """A Core connection in one write transaction (the ingest hot path: no ORM)."""
        with self._serialized(), self.write_engine.begin() as conn:
            yield conn

    @contextmanager
    def _serialized(self) -> Iterator[None]:
        if self._write_lock is None:
            yield
        else:
            with self._write_lock:
                yield

    @contextmanager
    def reader(self) -> Iterator[Session]:
        """A session for reading; never takes the SQLite write lock."""
        with self._reader() as session:
            yield session

    def upgrade(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        command.upgrade(alembic_config(self.url), "head")

    def dispose(self) -> None:
        """Close every pooled connection (call after fork and at shutdown)."""
        self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            self.read_engine.dispose()


def alembic_config(url: str) -> Config:
    """An Alembic configuration for the migrations shipped with the package."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg
