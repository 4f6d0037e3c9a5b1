"""DICOMweb (PS3.18) for the node: QIDO-RS, WADO-RS and STOW-RS under ``/dicom-web``.

:func:`router` gathers one router per service; :mod:`archive.http` mounts it.
Query and retrieve need a token with the ``read`` scope, store one with
``write`` (attached on the routers, see :mod:`archive.dicomweb.deps`). The
services share the index queries of :mod:`archive.query` with C-FIND and store
through :meth:`archive.ingest.Ingest.store`, as C-STORE does.
"""

from __future__ import annotations

from fastapi import APIRouter

PREFIX = "/dicom-web"


def router() -> APIRouter:
    """All DICOMweb routes under :data:`PREFIX`."""
    from archive.dicomweb import qido, stow, wado

    combined = APIRouter(prefix=PREFIX)
    combined.include_router(qido.router)
    combined.include_router(wado.router)
    combined.include_router(stow.router)
    return combined
