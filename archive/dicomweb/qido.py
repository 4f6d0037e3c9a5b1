"""QIDO-RS: search for studies, series and instances (PS3.18 10.6).

Accepts the query parameters of PS3.18 8.3.4 (attribute=value by keyword or
tag, ``includefield``, ``fuzzymatching``, ``limit``, ``offset``) and answers
``application/dicom+json``. Matching is :mod:`archive.query`, the same code
as C-FIND; a malformed query gets 400 with the reason, never a 500.

References
----------
PS3.18 10.6, https://dicom.nema.org/medical/dicom/current/output/chtml/part18/sect_10.6.html
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydicom.datadict import keyword_for_tag, tag_for_keyword

from archive.dicomweb.deps import DICOM_JSON, AppContext, base_url, context, read_scope, uid
from archive.query import (
    KEYS,
    LEVEL_ORDER,
    InformationModelValues,
    QueryError,
    QueryLevelValues,
    new_query,
    order_by_level,
    statement,
    to_dataset,
)

logger = logging.getLogger(__name__)

router = APIRouter(tags=["QIDO-RS"], dependencies=[read_scope])

MAX_RESULTS = 1000
"""Most matches one response carries; more are paged with ``offset`` (Warning 299)."""

STUDY_FIELDS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
"""Attributes every study match carries (PS3.18 Table 10.6.3-3)."""
SERIES_FIELDS = (
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesInstanceUID",
    "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
)
INSTANCE_FIELDS = ("SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "InstanceNumber")
DEFAULT_FIELDS = {
    QueryLevelValues.STUDY: STUDY_FIELDS,
    QueryLevelValues.SERIES: SERIES_FIELDS,
    QueryLevelValues.IMAGE: INSTANCE_FIELDS,
}
TRUNCATED = "There are additional results that can be requested"
CONTROL = {"limit", "offset", "fuzzymatching", "includefield"}


def _keyword(name: str) -> str:
    """A query parameter name (keyword or 8 hex digits) as a keyword; else 400."""
    if tag_for_keyword(name) is not None:
        return name
    try:
        tag = int(name, 16) if len(name) == 8 else None
    except ValueError:
        tag = None
    keyword = keyword_for_tag(tag) if tag is not None else ""
    if not keyword:
        raise HTTPException(400, f"unknown attribute {name[:40]!r}")
    return keyword


def _int_param(value: str | None, name: str, default: int) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise HTTPException(400, f"{name} must be a non-negative integer") from None
    if number < 0:
        raise HTTPException(400, f"{name} must be a non-negative integer")
    return number


def search(
    request: Request,
    ctx: AppContext,
    level: QueryLevelValues,
    fixed: dict[str, str],
) -> JSONResponse:
    """Run one QIDO-RS search at `level`, with `fixed` keys from the path."""
    params = request.query_params
    fuzzy = params.get("fuzzymatching", "false").lower()
    if fuzzy not in ("true", "false"):
        raise HTTPException(400, "fuzzymatching must be true or false")
    asked = _int_param(params.get("limit"), "limit", MAX_RESULTS + 1)
    limit = min(asked, MAX_RESULTS)
    offset = _int_param(params.get("offset"), "offset", 0)
    include: list[str] = []
    include_all = False
    for value in params.getlist("includefield"):
        for name in value.split(","):
            name = name.strip()
            if name == "all":
                include_all = True
            elif name:
                include.append(_keyword(name))
    matching: list[tuple[str, str]] = list(fixed.items())
    for name, value in params.multi_items():
        if name in CONTROL:
            continue
        keyword = _keyword(name)
        if keyword == "Modality" and level is QueryLevelValues.STUDY:
            keyword = "ModalitiesInStudy"  # PS3.18 Table 10.6.1-5: Modality at study level
        matching.append((keyword, value))
    returning = list(DEFAULT_FIELDS[level])
    if level is not QueryLevelValues.STUDY and "StudyInstanceUID" not in fixed:
        returning = [*STUDY_FIELDS, *returning]  # PS3.18 10.6.3.3.2/3: study (and series) too
        if level is QueryLevelValues.IMAGE and "SeriesInstanceUID" not in fixed:
            returning = [*returning, *SERIES_FIELDS]
    if include_all:
        returning += [k for k, key in KEYS.items() if LEVEL_ORDER[key.level] <= LEVEL_ORDER[level]]
    returning += include
    try:
        query = new_query(
            level,
            InformationModelValues.STUDY_ROOT,
            matching,
            returning,
            ctx.db.dialect,
            fuzzy=fuzzy == "true",
        )
    except QueryError as exc:
        logger.warning("QIDO-RS refused: %s", exc.comment)
        raise HTTPException(400, exc.comment) from None
    stmt = order_by_level(statement(query), level).offset(offset).limit(limit + 1)
    base = base_url(request)
    with ctx.db.reader() as session:
        rows = session.execute(stmt).all()
    headers: dict[str, str] = {}
    if len(rows) > limit:
        rows = rows[:limit]
        if asked > MAX_RESULTS:
            # PS3.18 8.3.4.4.2: the server cut the response short, not the client's limit.
            headers["Warning"] = f"299 pacs-triage: {TRUNCATED}"
    body: list[dict[str, Any]] = []
    for row in rows:
        ds = to_dataset(query, row)
        del ds.QueryRetrieveLevel
        ds.RetrieveURL = _retrieve_url(base, ds, level)
        body.append(ds.to_json_dict())
    return JSONResponse(body, media_type=DICOM_JSON, headers=headers)


def _retrieve_url(base: str, ds: Any, level: QueryLevelValues) -> str:
    url = f"{base}/studies/{ds.StudyInstanceUID}"
    if level is not QueryLevelValues.STUDY:
        url += f"/series/{ds.SeriesInstanceUID}"
    if level is QueryLevelValues.IMAGE:
        url += f"/instances/{ds.SOPInstanceUID}"
    return url


@router.get("/studies")
def search_studies(request: Request, ctx: AppContext = Depends(context)) -> JSONResponse:
    """Search for studies (PS3.18 10.6.1, resource ``{/studies}``)."""
    return search(request, ctx, QueryLevelValues.STUDY, {})


@router.get("/series")
def search_series(request: Request, ctx: AppContext = Depends(context)) -> JSONResponse:
    """Search for series in all studies."""
    return search(request, ctx, QueryLevelValues.SERIES, {})


@router.get("/instances")
def search_instances(request: Request, ctx: AppContext = Depends(context)) -> JSONResponse:
    """Search for instances in all studies."""
    return search(request, ctx, QueryLevelValues.IMAGE, {})


@router.get("/studies/{study_instance_uid}/series")
def search_study_series(
    study_instance_uid: str, request: Request, ctx: AppContext = Depends(context)
) -> JSONResponse:
    """Search for series of one study."""
    study = uid(study_instance_uid, "StudyInstanceUID")
    return search(request, ctx, QueryLevelValues.SERIES, {"StudyInstanceUID": study})


@router.get("/studies/{study_instance_uid}/instances")
def search_study_instances(
    study_instance_uid: str, request: Request, ctx: AppContext = Depends(context)
) -> JSONResponse:
    """Search for instances of one study."""
    study = uid(study_instance_uid, "StudyInstanceUID")
    return search(request, ctx, QueryLevelValues.IMAGE, {"StudyInstanceUID": study})


@router.get("/studies/{study_instance_uid}/series/{series_instance_uid}/instances")
def search_series_instances(
    study_instance_uid: str,
    series_instance_uid: str,
    request: Request,
    ctx: AppContext = Depends(context),
) -> JSONResponse:
    """Search for instances of one series."""
    fixed = {
        "StudyInstanceUID": uid(study_instance_uid, "StudyInstanceUID"),
        "SeriesInstanceUID": uid(series_instance_uid, "SeriesInstanceUID"),
    }
    return search(request, ctx, QueryLevelValues.IMAGE, fixed)
