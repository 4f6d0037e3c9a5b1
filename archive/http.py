"""The node's HTTP service: one FastAPI application for DICOMweb, the worklist and the API.

:func:`create_app` builds the application around an :class:`AppContext` (the
node's settings, index, file store and ingest path); routers owned by other
modules (DICOMweb, worklist, cohorts) are included here so that one process
serves them all. :class:`HttpService` runs it with uvicorn in a thread of the
node process.

Access control: every route except ``/healthz`` needs a bearer token with the
right scope (``read``, ``write`` or ``admin``; admin implies the others). Tokens
come from the settings and from a token file (``<data_dir>/http-tokens`` by
default, created with one admin token on first start). Browsers that cannot set
an ``Authorization`` header (``EventSource``) may send the token in the
``pacs_triage_token`` cookie. Loopback callers are served without a token only
when ``http_open_on_loopback`` is set.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select

from archive.config import Settings, TokenScopeValues
from archive.db import Database
from archive.index import ModelResultRecord, Study, StudyTriage
from archive.ingest import Ingest
from archive.store import FileStore
from pipeline.uids import InvalidUIDError, validate_uid

logger = logging.getLogger(__name__)

TOKEN_COOKIE = "pacs_triage_token"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name and what it may do."""

    name: str
    scopes: frozenset[TokenScopeValues]

    def may(self, scope: TokenScopeValues) -> bool:
        """True if this caller holds `scope` (admin holds every scope)."""
        return scope in self.scopes or TokenScopeValues.ADMIN in self.scopes


LOOPBACK_PRINCIPAL = Principal("loopback", frozenset(TokenScopeValues))


def parse_token_file(path: Path) -> list[tuple[str, Principal]]:
    """Read a token file: ``<token> <scope>[,<scope>...] [name]`` per line, ``#`` comments.

    Raises
    ------
    ValueError
        A line that is not of that form, or an unknown scope (the line number is
        given; the token is not).
    """
    entries: list[tuple[str, Principal]] = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < 2 or len(parts[0]) < 16:
            raise ValueError(f"{path}:{number}: expected '<token of >= 16 chars> <scopes> [name]'")
        try:
            scopes = frozenset(TokenScopeValues(s) for s in parts[1].split(",") if s)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
        name = parts[2] if len(parts) > 2 else f"{path.name}:{number}"
        entries.append((parts[0], Principal(name, scopes)))
    return entries


def ensure_token_file(settings: Settings) -> Path | None:
    """Create the default token file with one admin token if no token is configured.

    Returns the path of a newly created file, else None. The token itself is
    never logged: read it from the file (mode 0600).
    """
    path = settings.resolved_http_token_file
    if settings.http_tokens or path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("# pacs-triage HTTP tokens: <token> <scopes: read,write,admin> [name]\n")
        handle.write(f"{secrets.token_urlsafe(32)} admin admin\n")
    logger.info("created HTTP token file %s with one admin token", path)
    return path


class TokenBook:
    """The accepted bearer tokens, compared in constant time."""

    def __init__(self, entries: Iterable[tuple[str, Principal]]) -> None:
        self._entries = [(token.encode(), principal) for token, principal in entries]

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenBook:
        """Tokens from the settings plus the token file, if it exists."""
        entries = [
            (t.token.get_secret_value(), Principal(t.name, frozenset(t.scopes)))
            for t in settings.http_tokens
        ]
        path = settings.resolved_http_token_file
        if path.is_file():
            entries.extend(parse_token_file(path))
        return cls(entries)

    def lookup(self, token: str) -> Principal | None:
        """The principal holding `token`, or None."""
        given = token.encode()
        found: Principal | None = None
        for known, principal in self._entries:
            if hmac.compare_digest(known, given):
                found = principal
        return found


@dataclass
class AppContext:
    """What HTTP handlers work with: the node's settings, index, store and ingest path."""

    settings: Settings
    db: Database
    file_store: FileStore
    ingest: Ingest
    tokens: TokenBook
    extras: dict[str, Any] = field(default_factory=dict)
    """Services other modules attach (e.g. the triage dispatcher), by name."""


def context(request: Request) -> AppContext:
    """FastAPI dependency: the node's :class:`AppContext`."""
    return request.app.state.context


_bearer = HTTPBearer(auto_error=False)


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def require_scope(scope: TokenScopeValues | str) -> Callable[..., Awaitable[Principal]]:
    """FastAPI dependency factory: the caller must hold `scope`.

    401 with ``WWW-Authenticate: Bearer`` when no or an unknown token is given
    (RFC 6750 section 3), 403 when the token lacks the scope.
    """
    needed = TokenScopeValues(scope)

    async def dependency(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ) -> Principal:
        ctx: AppContext = request.app.state.context
        token = credentials.credentials if credentials else request.cookies.get(TOKEN_COOKIE)
        if not token:
            client = request.client.host if request.client else None
            if ctx.settings.http_open_on_loopback and _is_loopback(client):
                return LOOPBACK_PRINCIPAL
            raise HTTPException(
                401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )
        principal = ctx.tokens.lookup(token)
        if principal is None:
            logger.warning("HTTP %s %s: unknown token", request.method, request.url.path)
            raise HTTPException(
                401,
                "unknown token",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if not principal.may(needed):
            raise HTTPException(403, f"token {principal.name!r} lacks the {needed} scope")
        return principal

    return dependency


def path_uid(value: str, keyword: str) -> str:
    """A UID from a URL, validated (PS3.5 9.1) before it reaches a query or a path; else 400."""
    try:
        return validate_uid(value, keyword)
    except InvalidUIDError as exc:
        raise HTTPException(400, str(exc)) from None


def _include_routers(app: FastAPI) -> None:
    """Routers owned by other modules; each adds its routes under its own prefix."""
    app.include_router(_api_router())
    from archive import dicomweb

    app.include_router(dicomweb.router())
    from archive.worklist.api import router as worklist_router

    app.include_router(worklist_router())
    from archive.cohort_api import router as cohort_router

    app.include_router(cohort_router())


def _api_router():  # type: ignore[no-untyped-def]
    from fastapi import APIRouter

    router = APIRouter(prefix="/api", tags=["api"])
    read = require_scope(TokenScopeValues.READ)

    @router.get("/studies/{study_instance_uid}/triage")
    def study_triage(
        study_instance_uid: str,
        ctx: AppContext = Depends(context),
        _: Principal = Depends(read),
    ) -> dict[str, Any]:
        """The triage state of one study; ``waiting_for_images`` when not yet complete."""
        uid = path_uid(study_instance_uid, "StudyInstanceUID")
        with ctx.db.reader() as session:
            row = session.execute(
                select(Study, StudyTriage)
                .outerjoin(StudyTriage, StudyTriage.study_pk == Study.id)
                .where(Study.study_instance_uid == uid)
            ).first()
            if row is not None:
                results = session.scalars(
                    select(ModelResultRecord)
                    .where(ModelResultRecord.study_pk == row[0].id)
                    .order_by(ModelResultRecord.created_at.desc(), ModelResultRecord.id.desc())
                ).all()
        if row is None:
            raise HTTPException(404, "no such study")
        study, triage = row
        if triage is None or study.last_received_at > triage.ready_at:
            state = "waiting_for_images"
        else:
            state = triage.state
        return {
            "StudyInstanceUID": uid,
            "state": state,
            "generation": triage.generation if triage else 0,
            "ready_at": triage.ready_at.isoformat() if triage else None,
            "finished_at": (
                triage.finished_at.isoformat() if triage and triage.finished_at else None
            ),
            "failure_reason": triage.failure_reason if triage else None,
            "priority_class": triage.priority_class if triage else None,
            "priority_score": triage.priority_score if triage else None,
            "priority_reason": triage.priority_reason if triage else None,
            "sr_sop_instance_uid": triage.sr_sop_instance_uid if triage else None,
            "started_at": (triage.started_at.isoformat() if triage and triage.started_at else None),
            # Every model result recorded for the study (active and shadow), newest first.
            "model_results": [
                {
                    "SeriesInstanceUID": r.series_instance_uid,
                    "model_name": r.model_name,
                    "model_version": r.model_version,
                    "weights_sha256": r.weights_sha256,
                    "mode": r.mode,
                    "inference_seconds": r.inference_seconds,
                    "findings": json.loads(r.findings),
                    "created_at": r.created_at.isoformat(),
                }
                for r in results
            ],
        }

    return router


def create_app(ctx: AppContext) -> FastAPI:
    """The node's FastAPI application around `ctx`."""
    app = FastAPI(title="pacs-triage", version="0.1.0")
    app.state.context = ctx
    if ctx.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=ctx.settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
            expose_headers=["Content-Type", "Content-Location", "Warning"],
        )

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """Liveness: the HTTP service answers (no token needed, no data disclosed)."""
        return {"status": "ok"}

    _include_routers(app)
    return app


class HttpService:
    """Runs the FastAPI application with uvicorn in a thread of the node process."""

    def __init__(self, settings: Settings, app: FastAPI) -> None:
        self.settings = settings
        self.app = app
        self.port = settings.http_port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Bind and serve; returns once the server accepts connections."""
        config = uvicorn.Config(
            self.app,
            host=self.settings.http_host,
            port=self.settings.http_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        # The node owns the signals; uvicorn must not install handlers in a thread.
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._server = server
        self._thread = threading.Thread(target=server.run, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive():
                raise RuntimeError(
                    f"HTTP service failed to start on {self.settings.http_host}:"
                    f"{self.settings.http_port}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError("HTTP service did not start")
            time.sleep(0.02)
        sockets = [s for srv in server.servers for s in srv.sockets]
        if sockets:
            self.port = sockets[0].getsockname()[1]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (in-flight requests get `timeout` seconds)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
