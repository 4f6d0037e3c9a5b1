"""Shared fixtures of the flow tests: one real Prefect server per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from archive.prefect_server import ManagedPrefectServer


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedPrefectServer]:
    """A real ``prefect server start`` (started once; the flows of every test report to it)."""
    server = ManagedPrefectServer(tmp_path_factory.mktemp("prefect-home"))
    server.start()
    try:
        if not server.wait():
            pytest.fail(
                f"Prefect server did not start: {server.error}\n{server.log_path.read_text()}"
            )
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefect_api(prefect_server: ManagedPrefectServer) -> Iterator[str]:
    """This test's Prefect client talks to the session's server (no temporary server)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        yield prefect_server.api_url
