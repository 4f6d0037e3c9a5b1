"""WADO-RS: retrieve studies, series, instances, metadata, bulk data, frames, rendered images.

Instances go out as ``multipart/related; type="application/dicom"``, each part
the stored file byte for byte, in the transfer syntax it was stored in (the
archive never transcodes: asking for another transfer syntax gets 406).
Metadata is ``application/dicom+json`` with a BulkDataURI for every large
binary value. ``rendered`` and ``thumbnail`` are PNG or JPEG made by
:mod:`pipeline.render`, with ``window=center,width[,function]``.

References
----------
PS3.18 10.4, https://dicom.nema.org/medical/dicom/current/output/chtml/part18/sect_10.4.html
"""

from __future__ import annotations

import logging
from typing import Any

import pydicom
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydicom.dataelem import DataElement
from pydicom.encaps import generate_frames
from sqlalchemy import select

from archive.dicomweb.deps import DICOM_JSON, AppContext, base_url, context, read_scope, uid
from archive.dicomweb.multipart import content_type, new_boundary, parse_media_type, stream_parts
from archive.index import Instance, Series, Study
from pipeline.render import (
    ImageFormatValues,
    PixelDataError,
    Window,
    encode_image,
    render_dataset,
    thumbnail,
)

logger = logging.getLogger(__name__)

router = APIRouter(tags=["WADO-RS"], dependencies=[read_scope])

BULK_DATA_THRESHOLD = 1024
"""Binary values longer than this many bytes are sent as a BulkDataURI in metadata."""

FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
"""Media type of a compressed frame by transfer syntax (PS3.18 Table 8.7.3-2)."""


def _stored(
    ctx: AppContext, study: str, series: str | None = None, sop: str | None = None
) -> list[Any]:
    stmt = (
        select(
            Instance.path,
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Instance.transfer_syntax_uid,
            Series.series_instance_uid,
            Study.study_instance_uid,
        )
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .where(Study.study_instance_uid == uid(study, "StudyInstanceUID"))
    )
    if series is not None:
        stmt = stmt.where(Series.series_instance_uid == uid(series, "SeriesInstanceUID"))
    if sop is not None:
        stmt = stmt.where(Instance.sop_instance_uid == uid(sop, "SOPInstanceUID"))
    stmt = stmt.order_by(Series.id, Instance.instance_number, Instance.id)
    with ctx.db.reader() as session:
        rows = session.execute(stmt).all()
    if not rows:
        raise HTTPException(404, "no such study, series or instance")
    return rows


def _accepted_transfer_syntax(request: Request, part_type: str) -> str | None:
    """The transfer syntax the client asks for, '*' or None; 406 for what we cannot serve."""
    accept = request.headers.get("accept", "*/*")
    wanted: str | None = None
    for option in accept.split(","):
        media_type, params = parse_media_type(option)
        if media_type in ("*/*", "multipart/*"):
            return "*"
        if media_type == "multipart/related":
            inner = params.get("type", part_type).lower()
            if inner in (part_type, "*/*", "application/*"):
                return params.get("transfer-syntax", "*")
        if media_type == part_type:
            wanted = params.get("transfer-syntax", "*")
    if wanted is None:
        raise HTTPException(406, f"only multipart/related; type={part_type} is offered")
    return wanted


def _instances_response(request: Request, ctx: AppContext, rows: list[Any]) -> Response:
    wanted = _accepted_transfer_syntax(request, "application/dicom")
    if wanted not in (None, "*"):
        stored = {row.transfer_syntax_uid for row in rows}
        if stored != {wanted}:
            raise HTTPException(
                406, "instances are served in their stored transfer syntax (transfer-syntax=*)"
            )
    boundary = new_boundary()
    parts = [
        (
            f"application/dicom; transfer-syntax={row.transfer_syntax_uid}",
            ctx.file_store.absolute(row.path),
            {},
        )
        for row in rows
    ]
    return StreamingResponse(
        stream_parts(parts, boundary),
        media_type=content_type("application/dicom", boundary),
    )


@router.get("/studies/{study_instance_uid}")
def retrieve_study(
    study_instance_uid: str, request: Request, ctx: AppContext = Depends(context)
) -> Response:
    """Every instance of a study (PS3.18 10.4.1, Study resource)."""
    return _instances_response(request, ctx, _stored(ctx, study_instance_uid))


@router.get("/studies/{study_instance_uid}/series/{series_instance_uid}")
def retrieve_series(
    study_instance_uid: str,
    series_instance_uid: str,
    request: Request,
    ctx: AppContext = Depends(context),
) -> Response:
    """Every instance of a series."""
    return _instances_response(request, ctx, _stored(ctx, study_instance_uid, series_instance_uid))


@router.get(
    "/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}"
)
def retrieve_instance(
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    request: Request,
    ctx: AppContext = Depends(context),
) -> Response:
    """One instance."""
    rows = _stored(ctx, study_instance_uid, series_instance_uid, sop_instance_uid)
    return _instances_response(request, ctx, rows)


def _instance_url(base: str, row: Any) -> str:
    return (
        f"{base}/studies/{row.study_instance_uid}/series/{row.series_instance_uid}"
        f"/instances/{row.sop_instance_uid}"
    )


def _metadata(request: Request, ctx: AppContext, rows: list[Any]) -> JSONResponse:
    base = base_url(request)
    body = []
    for row in rows:
        url = _instance_url(base, row)
        ds = pydicom.dcmread(ctx.file_store.absolute(row.path))

        def bulk(elem: DataElement, url: str = url) -> str:
            return f"{url}/bulkdata/{elem.tag:08X}"

        body.append(
            ds.to_json_dict(bulk_data_threshold=BULK_DATA_THRESHOLD, bulk_data_element_handler=bulk)
        )
    return JSONResponse(body, media_type=DICOM_JSON)


@router.get("/studies/{study_instance_uid}/metadata")
def study_metadata(
    study_instance_uid: str, request: Request, ctx: AppContext = Depends(context)
) -> JSONResponse:
    """Metadata of every instance of a study, as DICOM JSON (PS3.18 10.4.1.1.2)."""
    return _metadata(request, ctx, _stored(ctx, study_instance_uid))


@router.get("/studies/{study_instance_uid}/series/{series_instance_uid}/metadata")
def series_metadata(
    study_instance_uid: str,
    series_instance_uid: str,
    request: Request,
    ctx: AppContext = Depends(context),
) -> JSONResponse:
    """Metadata of every instance of a series."""
    return _metadata(request, ctx, _stored(ctx, study_instance_uid, series_instance_uid))


_INSTANCE = (
    "/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}"
)


@router.get(_INSTANCE + "/metadata")
def instance_metadata(
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    request: Request,
    ctx: AppContext = Depends(context),
) -> JSONResponse:
    """Metadata of one instance."""
    rows = _stored(ctx, study_instance_uid, series_instance_uid, sop_instance_uid)
    return _metadata(request, ctx, rows)


def _read_one(ctx: AppContext, study: str, series: str, sop: str) -> tuple[Any, pydicom.Dataset]:
    row = _stored(ctx, study, series, sop)[0]
    return row, pydicom.dcmread(ctx.file_store.absolute(row.path))


@router.get(_INSTANCE + "/bulkdata/{tag}")
def bulk_data(
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    tag: str,
    ctx: AppContext = Depends(context),
) -> Response:
    """One top-level binary value as application/octet-stream (PS3.18 10.4.1.1.5)."""
    try:
        number = int(tag, 16)
    except ValueError:
        raise HTTPException(400, "bulk data tag must be 8 hexadecimal digits") from None
    _, ds = _read_one(ctx, study_instance_uid, series_instance_uid, sop_instance_uid)
    if number not in ds:
        raise HTTPException(404, f"no attribute {tag} in this instance")
    value = ds[number].value
    if not isinstance(value, bytes):
        raise HTTPException(400, f"attribute {tag} is not bulk data")
    boundary = new_boundary()
    return Response(
        b"".join(stream_parts([("application/octet-stream", value, {})], boundary)),
        media_type=content_type("application/octet-stream", boundary),
    )


def _frame_numbers(frame_list: str, frames: int) -> list[int]:
    try:
        numbers = [int(n) for n in frame_list.split(",")]
    except ValueError:
        raise HTTPException(400, "frames must be a comma-separated list of numbers") from None
    bad = [n for n in numbers if not 1 <= n <= frames]
    if bad:
        raise HTTPException(404, f"frame {bad[0]} does not exist: the instance has {frames}")
    return numbers


@router.get(_INSTANCE + "/frames/{frame_list}")
def retrieve_frames(
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    frame_list: str,
    ctx: AppContext = Depends(context),
) -> Response:
    """Frames (1-based): native as octet-stream, compressed as stored (PS3.18 10.4.1.1.4)."""
    row, ds = _read_one(ctx, study_instance_uid, series_instance_uid, sop_instance_uid)
    if "PixelData" not in ds:
        raise HTTPException(404, "the instance has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    numbers = _frame_numbers(frame_list, frames)
    ts = row.transfer_syntax_uid
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        media_type = FRAME_MEDIA_TYPES.get(ts, "application/octet-stream")
        all_frames = list(generate_frames(ds.PixelData, number_of_frames=frames))
        payloads = [all_frames[n - 1] for n in numbers]
    else:
        media_type = "application/octet-stream"
        size = ds.Rows * ds.Columns * int(ds.get("SamplesPerPixel", 1)) * ds.BitsAllocated // 8
        payloads = [ds.PixelData[(n - 1) * size : n * size] for n in numbers]
    boundary = new_boundary()
    parts = [(f"{media_type}; transfer-syntax={ts}", p, {}) for p in payloads]
    return Response(
        b"".join(stream_parts(parts, boundary)), media_type=content_type(media_type, boundary)
    )


def _image_format(request: Request) -> ImageFormatValues:
    accept = request.headers.get("accept", "image/jpeg").lower()
    if "image/png" in accept:
        return ImageFormatValues.PNG
    if "image/jpeg" in accept or "*/*" in accept or "image/*" in accept:
        return ImageFormatValues.JPEG
    raise HTTPException(406, "rendered images are offered as image/jpeg or image/png")


def _window(value: str | None) -> Window | None:
    if value is None:
        return None
    pieces = value.split(",")
    try:
        center, width = float(pieces[0]), float(pieces[1])
        function = pieces[2].strip().upper() if len(pieces) > 2 else "LINEAR"
        return Window(center, width, function)
    except (ValueError, IndexError) as exc:
        raise HTTPException(400, f"window must be center,width[,function]: {exc}") from None


def _render(
    request: Request, ds: pydicom.Dataset, frame: int, *, max_size: int | None = None
) -> Response:
    image_format = _image_format(request)
    params = request.query_params
    window = _window(params.get("window"))
    quality = 90
    if "quality" in params:
        try:
            quality = int(params["quality"])
        except ValueError:
            raise HTTPException(400, "quality must be an integer 1-100") from None
        if not 1 <= quality <= 100:
            raise HTTPException(400, "quality must be an integer 1-100")
    if "viewport" in params:
        try:
            sizes = [int(v) for v in params["viewport"].split(",")[:2]]
        except ValueError:
            raise HTTPException(400, "viewport must be columns,rows") from None
        if not sizes or min(sizes) < 1:
            raise HTTPException(400, "viewport must be columns,rows")
        max_size = max(sizes)
    try:
        image = render_dataset(ds, frame, window=window)
    except PixelDataError as exc:
        raise HTTPException(400, f"cannot render: {exc}") from None
    except (AttributeError, KeyError, TypeError):
        raise HTTPException(400, "cannot render: the instance is not an image") from None
    if max_size is not None:
        image = thumbnail(image, max_size)
    data = encode_image(image, image_format, min(quality, 95))
    return Response(data, media_type=image_format.media_type)


@router.get(_INSTANCE + "/rendered")
def rendered_instance(
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    request: Request,
    ctx: AppContext = Depends(context),
) -> Response:
    """The first frame rendered for display (PS3.18 10.4.1.1.3, rendered resources)."""
    _, ds = _read_one(ctx, study_instance_uid, series_instance_uid, sop_instance_uid)
    return _render(request, ds, 0)


@router.get(_INSTANCE + "/frames/{frame_number}/rendered")
def rendered_frame(
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    frame_number: int,
    request: Request,
    ctx: AppContext = Depends(context),
) -> Response:
    """One frame (1-based) rendered for display."""
    _, ds = _read_one(ctx, study_instance_uid, series_instance_uid, sop_instance_uid)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    _frame_numbers(str(frame_number), frames)
    return _render(request, ds, frame_number - 1)


THUMBNAIL_SIZE = 128


def _thumbnail(request: Request, ctx: AppContext, rows: list[Any]) -> Response:
    # The middle instance stands for a series or study (PS3.18 10.4.1.1.6 thumbnails).
    row = rows[len(rows) // 2]
    ds = pydicom.dcmread(ctx.file_store.absolute(row.path))
    return _render(request, ds, 0, max_size=THUMBNAIL_SIZE)


@router.get(_INSTANCE + "/thumbnail")
def instance_thumbnail(
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    request: Request,
    ctx: AppContext = Depends(context),
) -> Response:
    """A small rendered image of one instance."""
    rows = _stored(ctx, study_instance_uid, series_instance_uid, sop_instance_uid)
    return _thumbnail(request, ctx, rows)


@router.get("/studies/{study_instance_uid}/series/{series_instance_uid}/thumbnail")
def series_thumbnail(
    study_instance_uid: str,
    series_instance_uid: str,
    request: Request,
    ctx: AppContext = Depends(context),
) -> Response:
    """A small rendered image standing for a series."""
    return _thumbnail(request, ctx, _stored(ctx, study_instance_uid, series_instance_uid))
