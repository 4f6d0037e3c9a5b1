"""DIMSE service handlers: one function per service, each returning a status.

Handlers take the pynetdicom event and their dependencies explicitly. A store
handler hands the received bytes to :class:`archive.ingest.Ingest` (no pixel
decoding) and answers with the status it returns; it never runs a model or
waits on a flow. Nothing here logs patient data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.events import Event

from archive import status
from archive.ingest import Ingest

logger = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]
"""Where a handler tells the node about associations (see archive.stability)."""


def _status(code: int, comment: str = "") -> Dataset:
    rsp = Dataset()
    rsp.Status = code
    if comment:
        rsp.ErrorComment = comment[:64]
    return rsp


def handle_echo(event: Event) -> int:
    """C-ECHO: always Success (PS3.4 A.4, Verification Service Class)."""
    return status.SUCCESS


def handle_store(event: Event, ingest: Ingest, on_report: Report | None = None) -> Dataset:
    """C-STORE: store the data set exactly as received and answer only once it is durable.

    References
    ----------
    PS3.4 B.2.3, https://dicom.nema.org/medical/dicom/current/output/chtml/part04/sect_B.2.3.html
    """
    requestor = event.assoc.requestor
    try:
        data = event.encoded_dataset(include_meta=True)
    except Exception:
        logger.exception("could not assemble the received data set")
        return _status(status.CANNOT_UNDERSTAND, "data set could not be assembled")
    result = ingest.store(
        data,
        calling_ae_title=requestor.ae_title,
        source_address=requestor.address,
        affected_sop_class_uid=event.request.AffectedSOPClassUID,
        affected_sop_instance_uid=event.request.AffectedSOPInstanceUID,
    )
    if result.ok:
        studies = delivered_studies(event.assoc)
        if result.study_instance_uid not in studies:
            studies.add(result.study_instance_uid)
            if on_report is not None:
                on_report(
                    {
                        "type": "delivering",
                        "association": association_id(event.assoc),
                        "study": result.study_instance_uid,
                    }
                )
    return _status(result.status, result.error_comment)


def association_id(assoc: Association) -> str:
    """An identifier of the association unique across the node's worker processes."""
    return f"{os.getpid()}:{id(assoc)}"


def delivered_studies(assoc: Association) -> set[str]:
    """Study Instance UIDs that instances stored on this association belong to."""
    studies: set[str] | None = getattr(assoc, "pacs_triage_studies", None)
    if studies is None:
        studies = set()
        assoc.pacs_triage_studies = studies
    return studies


def handle_connection_closed(event: Event, on_report: Report) -> None:
    """Report a finished association and the studies it delivered.

    The node's study stability tracker uses this to shorten the quiet period
    when the sender is done (the sender releasing its association is the best
    sign we get that a study is complete).
    """
    assoc = event.assoc
    on_report(
        {
            "type": "closed",
            "association": association_id(assoc),
            "calling_ae_title": assoc.requestor.ae_title,
            "released": bool(assoc.is_released),
            "studies": sorted(delivered_studies(assoc)),
        }
    )
