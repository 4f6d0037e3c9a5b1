"""STOW-RS: store instances sent as multipart/related; type="application/dicom" (PS3.18 10.5).

Every part goes through :meth:`archive.ingest.Ingest.store`, the path C-STORE
takes, with the same validation and durability: an instance counts as stored
only once its file and index row are durable. The response lists stored
instances in ReferencedSOPSequence (0008,1199) and refused ones in
FailedSOPSequence (0008,1198) with a FailureReason (0008,1197). Status: 200
all stored, 202 some refused or stored with a warning, 409 all refused, 415
for a media type other than application/dicom.

References
----------
PS3.18 10.5, https://dicom.nema.org/medical/dicom/current/output/chtml/part18/sect_10.5.html
"""

from __future__ import annotations

import io
import logging

import pydicom
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset

from archive import status
from archive.dicomweb.deps import DICOM_JSON, AppContext, base_url, context, uid, write_scope
from archive.dicomweb.multipart import parse_media_type, split_parts
from archive.ingest import StoreResult

logger = logging.getLogger(__name__)

router = APIRouter(tags=["STOW-RS"], dependencies=[write_scope])

STOW_AE_TITLE = "STOW-RS"

# PS3.18 Table 10.5.3-2 / PS3.4 B.2.3 reasons, for parts refused before ingest
REASON_MEDIA_TYPE = 0xC000
"""A part that is not application/dicom (STOW-RS stores only PS3.10 instances)."""
REASON_STUDY_MISMATCH = 0xA900
"""Study Instance UID of the instance differs from the one in the request URL."""


async def _store(request: Request, ctx: AppContext, study: str | None) -> JSONResponse:
    media_type, params = parse_media_type(request.headers.get("content-type", ""))
    if media_type != "multipart/related":
        raise HTTPException(415, 'STOW-RS takes multipart/related; type="application/dicom"')
    part_type = params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        raise HTTPException(415, f"only application/dicom parts are stored, not {part_type}")
    boundary = params.get("boundary")
    if not boundary:
        raise HTTPException(400, "multipart/related without a boundary parameter")
    body = await request.body()
    try:
        parts = split_parts(body, boundary)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    address = request.client.host if request.client else ""
    base = base_url(request)
    referenced: list[Dataset] = []
    failed: list[Dataset] = []
    for number, part in enumerate(parts, start=1):
        if part.media_type != "application/dicom":
            failed.append(_failed(None, REASON_MEDIA_TYPE))
            logger.warning("STOW-RS part %d refused: media type %s", number, part.media_type)
            continue
        if study is not None and _study_of(part.body) not in (None, study):
            failed.append(_failed(None, REASON_STUDY_MISMATCH))
            logger.warning("STOW-RS part %d refused: not of the study in the URL", number)
            continue
        result: StoreResult = await run_in_threadpool(
            ctx.ingest.store, part.body, calling_ae_title=STOW_AE_TITLE, source_address=address
        )
        if not result.ok:
            failed.append(_failed(result, result.status))
            continue
        item = Dataset()
        item.ReferencedSOPClassUID = result.sop_class_uid
        item.ReferencedSOPInstanceUID = result.sop_instance_uid
        item.RetrieveURL = (
            f"{base}/studies/{result.study_instance_uid}/series/{result.series_instance_uid}"
            f"/instances/{result.sop_instance_uid}"
        )
        if result.status != status.SUCCESS:
            item.WarningReason = result.status
        referenced.append(item)
    response = Dataset()
    if study is not None:
        response.RetrieveURL = f"{base}/studies/{study}"
    if referenced:
        response.ReferencedSOPSequence = referenced
    if failed:
        response.FailedSOPSequence = failed
    warned = any("WarningReason" in item for item in referenced)
    # PS3.18 10.5.3: 202 when some failed or were stored with warnings; 409 when all failed.
    code = 409 if failed and not referenced else (202 if failed or warned else 200)
    logger.info("STOW-RS: %d stored, %d refused", len(referenced), len(failed))
    return JSONResponse(response.to_json_dict(), status_code=code, media_type=DICOM_JSON)


def _failed(result: StoreResult | None, reason: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = result.sop_class_uid if result and result.sop_class_uid else None
    item.ReferencedSOPInstanceUID = (
        result.sop_instance_uid if result and result.sop_instance_uid else None
    )
    item.FailureReason = reason
    return item


def _study_of(data: bytes) -> str | None:
    """The Study Instance UID of a part, or None if it cannot be read (ingest will say why)."""
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data), stop_before_pixels=True, specific_tags=["StudyInstanceUID"]
        )
        return str(ds.StudyInstanceUID).strip("\x00 ")
    except Exception:
        return None


@router.post("/studies")
async def store_instances(request: Request, ctx: AppContext = Depends(context)) -> JSONResponse:
    """Store instances of any study (PS3.18 10.5.1)."""
    return await _store(request, ctx, None)


@router.post("/studies/{study_instance_uid}")
async def store_study_instances(
    study_instance_uid: str, request: Request, ctx: AppContext = Depends(context)
) -> JSONResponse:
    """Store instances of one study; an instance of another study is refused (0xA900)."""
    return await _store(request, ctx, uid(study_instance_uid, "StudyInstanceUID"))
