"""Dependencies of the DICOMweb routers: scopes, the node context, UID path parameters."""

from __future__ import annotations

from fastapi import Depends, Request

from archive.config import TokenScopeValues
from archive.http import AppContext, context, require_scope
from archive.http import path_uid as uid

read_scope = Depends(require_scope(TokenScopeValues.READ))
write_scope = Depends(require_scope(TokenScopeValues.WRITE))

DICOM_JSON = "application/dicom+json"


def base_url(request: Request) -> str:
    """The DICOMweb base URL as the client sees it (for RetrieveURL and BulkDataURI)."""
    from archive.dicomweb import PREFIX

    return str(request.base_url).rstrip("/") + PREFIX


__all__ = ["DICOM_JSON", "AppContext", "base_url", "context", "read_scope", "uid", "write_scope"]
