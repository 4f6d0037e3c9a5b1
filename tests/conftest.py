"""Shared fixtures: real PostgreSQL and SQLite indexes, real DICOM data, real peers."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from archive.db import Database
from tests.peers import CT_SERIES_DIR, SHARED_DATA, TRANSFER_SYNTAX_DIR

POSTGRES_ADMIN_URL = os.environ.get(
    "PACS_TRIAGE_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test"
)
REQUIRED_PROGRAMS = ("storescu", "echoscu", "findscu", "movescu", "getscu", "storescp")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "network: starts real DICOM/HTTP peers")


@pytest.fixture(scope="session")
def dcmtk() -> None:
    """dcmtk's command-line tools, which CI installs with apt-get."""
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]
    if missing:
        pytest.fail(
            f"dcmtk programs missing: {missing}; run scripts/setup.sh (apt-get install dcmtk)"
        )


def _shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real DICOM data not available at {path} (a checkout without ../shared/data)")
    return path


@pytest.fixture(scope="session")
def ct_series_files() -> list[Path]:
    """The 134-slice CT series of ../shared/data/ct-pancreas-tcia."""
    return sorted(_shared(CT_SERIES_DIR).glob("*.dcm"))


@pytest.fixture(scope="session")
def transfer_syntax_files() -> list[Path]:
    """One MR image in nine transfer syntaxes (../shared/data/transfer-syntaxes)."""
    return sorted(_shared(TRANSFER_SYNTAX_DIR).glob("*.dcm"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _shared(SHARED_DATA)


class PostgresDatabases:
    """Creates throwaway PostgreSQL databases from one migrated template."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = make_url(admin_url)
        self.engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        self.template = f"pacs_triage_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.created: list[str] = []

    def url_for(self, name: str) -> str:
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def prepare_template(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.template}"'))
        template = Database(self.url_for(self.template))
        template.upgrade()
        template.dispose()

    def create(self) -> str:
        name = f"pacs_triage_t_{uuid.uuid4().hex[:12]}"
        with self.engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"'))
        self.created.append(name)
        return self.url_for(name)

    def drop(self, url: str) -> None:
        name = make_url(url).database
        with self.engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def close(self) -> None:
        with self.engine.connect() as conn:
            for name in [*self.created, self.template]:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.engine.dispose()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresDatabases]:
    """Access to the real PostgreSQL server (127.0.0.1:5432, database ``test``)."""
    databases = PostgresDatabases(POSTGRES_ADMIN_URL)
    try:
        databases.prepare_template()
    except Exception as exc:  # no server: the suite must say so, not pass silently
        pytest.fail(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    yield databases
    databases.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty, migrated index on SQLite and on PostgreSQL (the test runs once for each)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.sqlite'}"
        Database(url).upgrade()
        yield url
    else:
        databases: PostgresDatabases = request.getfixturevalue("postgres")
        url = databases.create()
        yield url
        databases.drop(url)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    yield database
    database.dispose()
