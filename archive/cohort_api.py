"""HTTP API of research cohorts under ``/api/cohorts``.

Accepts JSON requests (validated by pydantic models) and answers with the
cohorts' state: list and status need the ``read`` scope; creating a cohort
and starting a run need ``admin``. A run started here is a ``pacs-triage
cohort run`` child process of the node in embedded mode (so its torch threads
and CPU stay apart from clinical triage, which it yields to), or a flow run on
the ``cohort`` work queue when a Prefect server is configured. Never logs
patient data.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field

from archive.config import TokenScopeValues
from archive.http import AppContext, Principal, context, require_scope

logger = logging.getLogger(__name__)


class QueryBody(BaseModel):
    """Filters over the index (see :class:`archive.cohorts.StudyQuery`)."""

    patient_ids: list[str] = Field(default_factory=list)
    accession_numbers: list[str] = Field(default_factory=list)
    study_date_from: str | None = Field(default=None, pattern=r"^\d{8}$")
    study_date_to: str | None = Field(default=None, pattern=r"^\d{8}$")
    modalities: list[str] = Field(default_factory=list)
    study_description: str | None = None
    body_part: str | None = None
    analysed_by: str | None = None
    not_analysed_by: str | None = None
    limit: int | None = Field(default=None, ge=1)


class CohortCreate(BaseModel):
    """A new cohort: its name, its model, and either a query or a list of Study Instance UIDs."""

    name: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1)
    model_version: str | None = None
    query: QueryBody | None = None
    study_instance_uids: list[str] | None = None
    write_sr: bool | None = None


class CohortRun(BaseModel):
    concurrency: int | None = Field(default=None, ge=1, le=16)
    write_sr: bool | None = None


def _registry(ctx: AppContext) -> Any:
    registry = ctx.extras.get("cohort_registry")
    if registry is None:
        from models.registry import ModelRegistry, default_model_directories

        registry = ModelRegistry.discover(default_model_directories(ctx.settings))
        ctx.extras["cohort_registry"] = registry
    return registry


def router() -> APIRouter:
    """The ``/api/cohorts`` routes."""
    from archive.cohorts import (
        CohortError,
        StudyQuery,
        create_cohort,
        get_cohort,
        list_cohorts,
        select_studies,
        select_uids,
    )

    routes = APIRouter(prefix="/api/cohorts", tags=["cohorts"])
    read = require_scope(TokenScopeValues.READ)
    admin = require_scope(TokenScopeValues.ADMIN)

    @routes.get("")
    def cohorts(
        ctx: AppContext = Depends(context), _: Principal = Depends(read)
    ) -> list[dict[str, Any]]:
        """Every cohort with its counts per study status, newest first."""
        return [c.as_json() for c in list_cohorts(ctx.db)]

    @routes.get("/{name}")
    def cohort_status(
        name: str, ctx: AppContext = Depends(context), _: Principal = Depends(read)
    ) -> dict[str, Any]:
        """One cohort: model, selection, status, counts per study status."""
        try:
            return get_cohort(ctx.db, name).as_json()
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None

    @routes.post("", status_code=201)
    def create(
        body: CohortCreate,
        ctx: AppContext = Depends(context),
        principal: Principal = Depends(admin),
    ) -> dict[str, Any]:
        """Save a cohort from a query or a list of Study Instance UIDs."""
        if (body.query is None) == (body.study_instance_uids is None):
            raise HTTPException(422, "give exactly one of 'query' and 'study_instance_uids'")
        try:
            model = _registry(ctx).get(body.model, body.model_version)
        except LookupError as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            if body.query is not None:
                query = StudyQuery(**{k: v for k, v in body.query.model_dump().items()})
                studies = select_studies(ctx.db, query)
                selection: dict[str, Any] = {"kind": "query", "query": query.to_json()}
            else:
                studies = select_uids(ctx.db, body.study_instance_uids or [])
                selection = {"kind": "uids"}
            selection["study_instance_uids"] = [s.study_instance_uid for s in studies]
            info = create_cohort(
                ctx.db,
                body.name,
                model_name=model.identity.name,
                model_version=model.identity.version,
                weights_sha256=model.identity.weights_sha256,
                selection=selection,
                studies=studies,
                write_sr=ctx.settings.cohort_write_sr if body.write_sr is None else body.write_sr,
            )
        except CohortError as exc:
            status = 409 if "exists already" in str(exc) else 422
            raise HTTPException(status, str(exc)) from None
        logger.info("cohort %r created over HTTP by %s", info.name, principal.name)
        return info.as_json()

    @routes.post("/{name}/run", status_code=202)
    def run(
        name: str,
        body: CohortRun | None = None,
        ctx: AppContext = Depends(context),
        principal: Principal = Depends(admin),
    ) -> dict[str, Any]:
        """Start a run: a child process (embedded) or a flow run on the cohort queue."""
        body = body or CohortRun()
        try:
            get_cohort(ctx.db, name)
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        args = [sys.executable, "-m", "archive.cli", "cohort", "run", name, "--quiet"]
        if body.concurrency:
            args += ["--concurrency", str(body.concurrency)]
        if body.write_sr is not None:
            args.append("--sr" if body.write_sr else "--no-sr")
        if ctx.settings.resolved_prefect_api_url:
            args.append("--submit")
        settings = ctx.settings
        env = {
            **os.environ,
            "PACS_TRIAGE_DATA_DIR": str(settings.data_dir),
            "PACS_TRIAGE_DATABASE_URL": settings.resolved_database_url,
            "PACS_TRIAGE_MODELS_DIRS": json.dumps([str(p) for p in settings.models_dirs]),
            "PACS_TRIAGE_FSYNC": "true" if settings.fsync else "false",
        }
        process = subprocess.Popen(
            args,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        ctx.extras.setdefault("cohort_runs", {})[name] = process
        logger.info(
            "cohort %r run started over HTTP by %s (pid %d)", name, principal.name, process.pid
        )
        return {"name": name, "started": True, "pid": process.pid}

    return routes
