"""Starting a cohort run: in this process (embedded) or on the ``cohort`` work queue (distributed).

Accepts the node's settings and a cohort name. In **embedded** mode (no
Prefect API configured) it starts a managed Prefect server for this process
(:class:`archive.prefect_server.ManagedPrefectServer`, home
``<data_dir>/prefect-cohort``, so it never shares a database with the node's
own server) and runs the ``run_cohort`` flow here, yielding to the node's
clinical triage through the shared index. In **distributed** mode
(``PREFECT_API_URL`` or ``prefect_api_url`` set) it makes sure the work pool
with its ``triage`` (priority 1) and ``cohort`` (priority 10) queues and the
``run_cohort/cohort`` deployment exist, and submits one flow run to the
``cohort`` queue, so Prefect workers serve clinical triage first. Never
analyses anything itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from archive.config import Settings
from archive.dispatch import COHORT_QUEUE, deploy_on_work_pool

logger = logging.getLogger(__name__)

FLOW_NAME = "run_cohort"
DEPLOYMENT_NAME = "cohort"


@contextlib.contextmanager
def prefect_api(settings: Settings) -> Iterator[str]:
    """Point this process's Prefect client at a server: the configured one, or a managed one.

    Yields the API URL; a managed server is stopped on exit.
    """
    from archive.prefect_server import ManagedPrefectServer, use_api

    api_url = settings.resolved_prefect_api_url
    if api_url:
        use_api(api_url)
        yield api_url
        return
    server = ManagedPrefectServer(settings.data_dir / "prefect-cohort")
    server.start()
    try:
        if not server.wait():
            raise RuntimeError(server.error or "Prefect server did not start")
        use_api(server.api_url)
        yield server.api_url
    finally:
        server.stop()


def run_here(
    settings: Settings,
    cohort_name: str,
    *,
    concurrency: int | None = None,
    write_sr: bool | None = None,
    max_studies: int | None = None,
) -> dict[str, Any]:
    """Run the ``run_cohort`` flow in this process (the Prefect API must be set up)."""
    from flows import runtime
    from flows.cohort import run_cohort

    runtime.configure(runtime.TriageRuntime.from_settings(settings))
    return run_cohort(
        cohort_name, concurrency=concurrency, write_sr=write_sr, max_studies=max_studies
    )


def ensure_cohort_deployment(work_pool: str) -> str:
    """Create (idempotently) the work pool, its two queues and the cohort deployment.

    Uses the Prefect API of the current settings; returns the deployment id.
    """
    from flows.cohort import run_cohort

    return deploy_on_work_pool(
        run_cohort, "flows/cohort.py:run_cohort", DEPLOYMENT_NAME, work_pool, COHORT_QUEUE
    )


def submit(
    settings: Settings,
    cohort_name: str,
    *,
    concurrency: int | None = None,
    write_sr: bool | None = None,
) -> str:
    """Submit one ``run_cohort`` flow run to the ``cohort`` queue; return its flow run id."""
    from prefect.deployments import run_deployment

    ensure_cohort_deployment(settings.prefect_work_pool)
    run = run_deployment(
        name=f"{FLOW_NAME}/{DEPLOYMENT_NAME}",
        parameters={"cohort_name": cohort_name, "concurrency": concurrency, "write_sr": write_sr},
        timeout=0,
        work_queue_name=COHORT_QUEUE,
        tags=["cohort"],
    )
    logger.info("cohort %s submitted as flow run %s", cohort_name, run.id)
    return str(run.id)
