"""The worklist's HTTP routes: JSON API under ``/api/worklist`` and the page at ``/worklist``.

Thin adapter over :mod:`archive.worklist.service`: validates the request
(FastAPI models, UIDs), calls the service with the node's clock (injectable:
``AppContext.extras["clock"]``) and turns its errors into HTTP statuses (404
unknown study, 409 a state change the current state does not allow, 400 bad
input). Reading needs the ``read`` scope, actions the ``write`` scope. The
page and its script are static files; the page logs in by posting a token,
which sets an HttpOnly cookie, so no patient data and no token appear in a URL.
Live updates are Server-Sent Events fed by polling the index for changes.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import pydicom
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from archive.config import TokenScopeValues
from archive.http import (
    TOKEN_COOKIE,
    AppContext,
    Principal,
    context,
    path_uid,
    require_scope,
)
from archive.index import Instance, Series, Study, utcnow
from archive.outbox import delivery_status
from archive.worklist import service
from pipeline.render import encode_image, render_dataset, thumbnail

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
EVENT_STREAM_SECONDS = 25.0
"""One event stream lasts this long; the browser's EventSource reconnects by itself."""
THUMBNAIL_CACHE_SIZE = 256
_DATE = re.compile(r"^\d{8}$")
_NON_IMAGE_MODALITIES = {"SR", "KO", "PR", "DOC"}

read = require_scope(TokenScopeValues.READ)
write = require_scope(TokenScopeValues.WRITE)


def clock(ctx: AppContext) -> datetime:
    """The current time: ``ctx.extras["clock"]()`` when a test set one, else now (UTC)."""
    fake: Callable[[], datetime] | None = ctx.extras.get("clock")
    return fake() if fake is not None else utcnow()


def _uid(value: str) -> str:
    return path_uid(value, "StudyInstanceUID")


def _date(value: str | None, name: str) -> str | None:
    if value is None or value == "":
        return None
    compact = value.replace("-", "")
    if not _DATE.match(compact):
        raise HTTPException(400, f"{name} must be a date YYYYMMDD or YYYY-MM-DD")
    return compact


def _enum_list(raw: list[str] | None, enum: type, name: str) -> tuple[Any, ...]:
    values: list[Any] = []
    for entry in raw or []:
        for part in entry.split(","):
            if not part:
                continue
            try:
                values.append(enum(part.strip().lower()))
            except ValueError:
                allowed = ", ".join(e.value for e in enum)
                raise HTTPException(
                    400, f"{name}: unknown value {part!r} (one of {allowed})"
                ) from None
    return tuple(values)


class StateChange(BaseModel):
    """Body of ``POST /api/worklist/{uid}/state``."""

    state: service.ReadingStateValues


class FeedbackIn(BaseModel):
    """Body of ``POST /api/worklist/{uid}/feedback``."""

    verdict: service.VerdictValues
    comment: str = Field(default="", max_length=2000)
    finding: str | None = Field(default=None, max_length=128)


class Login(BaseModel):
    """Body of ``POST /api/worklist/session``."""

    token: str = Field(min_length=1, max_length=512)


class ThumbnailCache:
    """PNG thumbnails by (study, source instance, size): rendering a slice costs ~50 ms."""

    def __init__(self, size: int = THUMBNAIL_CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, int]) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple[str, str, int], value: bytes) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def _thumbnail_source(ctx: AppContext, study_pk: int, key_image_uid: str | None) -> tuple[str, str]:
    """(SOP Instance UID, relative path) of the image to show: key image, else a middle slice."""
    with ctx.db.reader() as session:
        if key_image_uid:
            path = session.scalars(
                select(Instance.path).where(Instance.sop_instance_uid == key_image_uid)
            ).one_or_none()
            if path:
                return key_image_uid, path
        series = session.execute(
            select(Series.id, Series.modality, Series.number_of_series_related_instances)
            .where(Series.study_pk == study_pk)
            .order_by(Series.number_of_series_related_instances.desc(), Series.id)
        ).all()
        for series_pk, modality, _ in series:
            if modality in _NON_IMAGE_MODALITIES:
                continue
            instances = session.execute(
                select(Instance.sop_instance_uid, Instance.path)
                .where(Instance.series_pk == series_pk)
                .order_by(Instance.instance_number, Instance.id)
            ).all()
            if instances:
                uid, path = instances[len(instances) // 2]
                return uid, path
    raise HTTPException(404, "the study has no image to show")


def router() -> APIRouter:
    """The worklist routes: ``/api/worklist/...`` (JSON, SSE, PNG) and ``/worklist`` (page)."""
    api = APIRouter(prefix="/api/worklist", tags=["worklist"])
    page = APIRouter(tags=["worklist page"])
    thumbnails = ThumbnailCache()

    @api.get("")
    def list_studies(
        ctx: AppContext = Depends(context),
        _: Principal = Depends(read),
        reading_state: Annotated[list[str] | None, Query()] = None,
        triage_state: Annotated[list[str] | None, Query()] = None,
        priority: Annotated[list[str] | None, Query()] = None,
        modality: Annotated[str | None, Query(max_length=16, pattern=r"^[A-Za-z0-9_]*$")] = None,
        study_date_from: str | None = None,
        study_date_to: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        """The worklist, most urgent first (see :func:`service.list_worklist`).

        ``reading_state`` defaults to unread and opened; ``all`` lists every study.
        """
        if reading_state and any(s.lower() == "all" for s in reading_state):
            reading: tuple[Any, ...] = ()
        else:
            reading = (
                _enum_list(reading_state, service.ReadingStateValues, "reading_state")
                or service.ACTIVE_READING_STATES
            )
        priorities = tuple(p.strip().upper() for e in priority or [] for p in e.split(",") if p)
        for value in priorities:
            if value not in ("STAT", "URGENT", "ROUTINE", "NONE"):
                raise HTTPException(400, f"priority: unknown value {value!r}")
        flt = service.WorklistFilter(
            reading_states=reading,
            triage_states=_enum_list(
                triage_state, service.WorklistTriageStateValues, "triage_state"
            ),
            modality=modality or None,
            priority_classes=priorities,
            study_date_from=_date(study_date_from, "study_date_from"),
            study_date_to=_date(study_date_to, "study_date_to"),
            limit=limit,
            offset=offset,
        )
        now = clock(ctx)
        items, total = service.list_worklist(ctx.db, flt, now)
        return {
            "now": now.isoformat(),
            "total": total,
            "limit": limit,
            "offset": offset,
            "items": [i.as_json() for i in items],
        }

    @api.get("/feedback")
    def feedback_export(
        ctx: AppContext = Depends(context),
        _: Principal = Depends(read),
        format: Literal["json", "csv"] = "json",
        days: Annotated[float | None, Query(gt=0)] = None,
    ) -> Response:
        """Every feedback given, for quality monitoring (JSON or CSV)."""
        since = clock(ctx) - timedelta(days=days) if days else None
        rows = service.export_feedback(ctx.db, since)
        if format == "json":
            return Response(
                content=json.dumps({"feedback": rows}),
                media_type="application/json",
            )
        buffer = io.StringIO()
        fields = [
            "id",
            "StudyInstanceUID",
            "AccessionNumber",
            "generation",
            "verdict",
            "finding",
            "model_name",
            "priority_class",
            "comment",
            "given_by",
            "created_at",
        ]
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        return Response(
            content=buffer.getvalue(),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="ai-feedback.csv"'},
        )

    @api.get("/quality")
    def quality(
        ctx: AppContext = Depends(context),
        _: Principal = Depends(read),
        window: Literal["day", "week"] = "day",
    ) -> dict[str, Any]:
        """Per model: analysed, flagged, feedback, PPV, false-alert rate, median time to triage."""
        span = timedelta(days=1 if window == "day" else 7)
        now = clock(ctx)
        return {
            "window": window,
            "now": now.isoformat(),
            "models": service.quality(ctx.db, now, span),
        }

    @api.get("/events")
    async def events(
        request: Request,
        ctx: AppContext = Depends(context),
        _: Principal = Depends(read),
    ) -> StreamingResponse:
        """Server-Sent Events: ``change`` whenever the worklist's content changed.

        The stream ends after a while (the browser reconnects, ``retry`` 1 s),
        so that a node can stop without waiting for idle browsers.
        """
        interval = ctx.settings.worklist_poll_seconds
        loop = asyncio.get_running_loop()

        async def stream() -> AsyncIterator[bytes]:
            yield b"retry: 1000\n\n"
            last = await run_in_threadpool(service.change_token, ctx.db)
            yield f"event: hello\ndata: {last}\n\n".encode()
            deadline = loop.time() + EVENT_STREAM_SECONDS
            beat = 0
            while loop.time() < deadline and not ctx.extras.get("stopping"):
                await asyncio.sleep(interval)
                if await request.is_disconnected():
                    return
                token = await run_in_threadpool(service.change_token, ctx.db)
                if token != last:
                    last = token
                    yield f"event: change\ndata: {token}\n\n".encode()
                else:
                    beat += 1
                    if beat * interval >= 10:
                        beat = 0
                        yield b": keep-alive\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @api.post("/session", status_code=204)
    def login(body: Login, request: Request, ctx: AppContext = Depends(context)) -> Response:
        """Exchange a token for an HttpOnly cookie (the page's login; no token in URLs)."""
        principal = ctx.tokens.lookup(body.token)
        if principal is None:
            logger.warning("worklist login with an unknown token")
            raise HTTPException(401, "unknown token")
        response = Response(status_code=204)
        response.set_cookie(
            TOKEN_COOKIE,
            body.token,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    @api.delete("/session", status_code=204)
    def logout() -> Response:
        """Forget the login cookie."""
        response = Response(status_code=204)
        response.delete_cookie(TOKEN_COOKIE, path="/")
        return response

    @api.get("/whoami")
    def whoami(principal: Principal = Depends(read)) -> dict[str, Any]:
        """Who the caller is and what it may do (the page uses it to check its login)."""
        return {"name": principal.name, "scopes": sorted(s.value for s in principal.scopes)}

    @api.get("/{study_instance_uid}")
    def study(
        study_instance_uid: str,
        ctx: AppContext = Depends(context),
        _: Principal = Depends(read),
    ) -> dict[str, Any]:
        """One study's worklist row, with the delivery state of its alerts and forwards."""
        uid = _uid(study_instance_uid)
        try:
            study_pk, item = service.get_item(ctx.db, uid, clock(ctx))
        except service.NotFoundError:
            raise HTTPException(404, "no such study") from None
        return {**item.as_json(), "deliveries": delivery_status(ctx.db, study_pk)}

    @api.post("/{study_instance_uid}/state")
    def change_state(
        study_instance_uid: str,
        body: StateChange,
        ctx: AppContext = Depends(context),
        principal: Principal = Depends(write),
    ) -> dict[str, Any]:
        """Mark a study opened, reported, dismissed or unread again (409 if not allowed now)."""
        uid = _uid(study_instance_uid)
        now = clock(ctx)
        try:
            previous = service.change_reading_state(ctx.db, uid, body.state, principal.name, now)
            _, item = service.get_item(ctx.db, uid, now)
        except service.NotFoundError:
            raise HTTPException(404, "no such study") from None
        except service.TransitionError as exc:
            raise HTTPException(409, str(exc)) from None
        logger.info("study %s: %s -> %s by %s", uid, previous, body.state, principal.name)
        return {"previous_state": previous.value, **item.as_json()}

    @api.post("/{study_instance_uid}/feedback", status_code=201)
    def feedback(
        study_instance_uid: str,
        body: FeedbackIn,
        ctx: AppContext = Depends(context),
        principal: Principal = Depends(write),
    ) -> dict[str, Any]:
        """Agree or disagree with the study's AI result (free-text comment kept for review)."""
        uid = _uid(study_instance_uid)
        try:
            return service.add_feedback(
                ctx.db,
                uid,
                body.verdict,
                body.comment,
                principal.name,
                clock(ctx),
                finding=body.finding,
            )
        except service.NotFoundError:
            raise HTTPException(404, "no such study") from None
        except service.TransitionError as exc:
            raise HTTPException(409, str(exc)) from None

    @api.get("/{study_instance_uid}/thumbnail.png")
    def study_thumbnail(
        study_instance_uid: str,
        ctx: AppContext = Depends(context),
        _: Principal = Depends(read),
        size: Annotated[int, Query(ge=32, le=1024)] = 256,
    ) -> Response:
        """The key image (else the middle slice of the largest image series), windowed, as PNG."""
        uid = _uid(study_instance_uid)
        with ctx.db.reader() as session:
            study_pk = session.scalars(
                select(Study.id).where(Study.study_instance_uid == uid)
            ).one_or_none()
        if study_pk is None:
            raise HTTPException(404, "no such study")
        try:
            _, item = service.get_item(ctx.db, uid, clock(ctx))
        except service.NotFoundError:
            raise HTTPException(404, "no such study") from None
        source_uid, path = _thumbnail_source(ctx, study_pk, item.key_image_sop_instance_uid)
        key = (uid, source_uid, size)
        png = thumbnails.get(key)
        if png is None:
            try:
                ds = pydicom.dcmread(ctx.file_store.absolute(path))
                png = encode_image(thumbnail(render_dataset(ds), size))
            except Exception as exc:
                logger.warning("thumbnail of %s failed: %s", source_uid, type(exc).__name__)
                raise HTTPException(422, "the image cannot be rendered") from None
            thumbnails.put(key, png)
        return Response(
            content=png,
            media_type="image/png",
            headers={"Cache-Control": "private, max-age=300"},
        )

    @page.get("/worklist", include_in_schema=False)
    def worklist_page() -> FileResponse:
        """The worklist page (static; it asks for a token and then uses the API)."""
        return FileResponse(STATIC_DIR / "worklist.html", headers={"Cache-Control": "no-cache"})

    @page.get("/worklist/quality", include_in_schema=False)
    def quality_page() -> FileResponse:
        """The quality view (static; data from ``/api/worklist/quality``)."""
        return FileResponse(STATIC_DIR / "quality.html", headers={"Cache-Control": "no-cache"})

    @page.get("/worklist/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        """The page's script and style sheet."""
        if name not in ("worklist.js", "worklist.css", "quality.js"):
            raise HTTPException(404, "no such file")
        return FileResponse(STATIC_DIR / name, headers={"Cache-Control": "no-cache"})

    combined = APIRouter()
    combined.include_router(api)
    combined.include_router(page)
    return combined
