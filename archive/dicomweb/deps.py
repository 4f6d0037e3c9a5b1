"""Dependencies of the DICOMweb routers: scopes, the node context, UID path parameters."""

from __future__ import annotations

from fastapi import Depends, HTTPException, Request

from archive.config import TokenScopeValues
from archive.http import AppContext, context, require_scope
from pipeline.uids import InvalidUIDError, validate_uid

read_scope = Depends(require_scope(TokenScopeValues.READ))
write_scope = Depends(require_scope(TokenScopeValues.WRITE))

DICOM_JSON = "application/dicom+json"


def uid(value: str, keyword: str) -> str:
    """A path UID, validated (PS3.5 9.1) before it reaches a query or a path; else 400."""
    try:
        return validate_uid(value, keyword)
    except InvalidUIDError as exc:
        raise HTTPException(400, str(exc)) from None


def base_url(request: Request) -> str:
    """The DICOMweb base URL as the client sees it (for RetrieveURL and BulkDataURI)."""
    from archive.dicomweb import PREFIX

    return str(request.base_url).rstrip("/") + PREFIX


__all__ = ["DICOM_JSON", "AppContext", "base_url", "context", "read_scope", "uid", "write_scope"]
