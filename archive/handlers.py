"""DIMSE service handlers: one function per service, each returning a status.

Handlers take the pynetdicom event and their dependencies explicitly. A store
handler hands the received bytes to :class:`archive.ingest.Ingest` (no pixel
decoding) and answers with the status it returns; it never runs a model or
waits on a flow. Nothing here logs patient data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext

from archive import status
from archive.config import Settings
from archive.db import Database
from archive.ingest import Ingest
from archive.query import (
    InformationModelValues,
    QueryError,
    parse_identifier,
    retrieve_statement,
    run,
)
from archive.store import FileStore

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
    sign we get that a study is complete). Bound to EVT_RELEASED and
    EVT_CONN_CLOSE (types ``released`` and ``closed``); the tracker takes the
    second report of one association as a repeat.
    """
    assoc = event.assoc
    on_report(
        {
            "type": "released" if event.event is evt.EVT_RELEASED else "closed",
            "association": association_id(assoc),
            "calling_ae_title": assoc.requestor.ae_title,
            "released": bool(assoc.is_released),
            "studies": sorted(delivered_studies(assoc)),
        }
    )


# --- Query/Retrieve (PS3.4 Annex C) -------------------------------------------------


class StoredInstance(Dataset):
    """A stored instance to send as a C-STORE sub-operation: its file, not a decoded data set.

    pynetdicom's C-GET/C-MOVE service loop wants a :class:`Dataset`; this one
    carries only the SOP Instance UID (for the failed-instances list) and the
    file path. :func:`archive.scp.send_stored_bytes` makes the association send
    the file's data set bytes as stored (no decoding, no transcoding).
    """

    def __init__(self, path: str, sop_instance_uid: str) -> None:
        super().__init__()
        self.SOPInstanceUID = sop_instance_uid
        self.stored_path = path


def _model_of(event: Event, models: dict[str, InformationModelValues]) -> InformationModelValues:
    return models.get(str(event.request.AffectedSOPClassUID), InformationModelValues.STUDY_ROOT)


def handle_find(
    event: Event, db: Database, models: dict[str, InformationModelValues]
) -> Iterator[tuple[int, Dataset | None]]:
    """C-FIND: match the identifier against the index, one Pending response per match.

    Stops with Cancel when the SCU sends C-CANCEL (PS3.4 C.4.1.2.3). A malformed
    identifier gets 0xA900 or 0xC000 with an Error Comment.

    References
    ----------
    PS3.4 C.4.1, https://dicom.nema.org/medical/dicom/current/output/chtml/part04/sect_C.4.html
    """
    try:
        query = parse_identifier(event.identifier, _model_of(event, models), db.dialect)
    except QueryError as exc:
        logger.warning("C-FIND refused: 0x%04X %s", exc.status, exc.comment)
        yield _status(exc.status, exc.comment), None
        return
    except Exception:
        logger.exception("C-FIND identifier could not be read")
        yield _status(status.UNABLE_TO_PROCESS, "identifier could not be read"), None
        return
    # PS3.4 C.4.1.1.4: FF01 when some Optional Keys were not supported (returned empty).
    pending = status.PENDING_WARNING if query.empty_keys else status.PENDING
    count = 0
    try:
        with db.reader() as session:
            for ds in run(session, query):
                if event.is_cancelled:
                    logger.info("C-FIND cancelled after %d match(es)", count)
                    yield status.CANCEL, None
                    return
                count += 1
                yield pending, ds
    except Exception:
        logger.exception("C-FIND failed after %d match(es)", count)
        yield _status(status.UNABLE_TO_PROCESS, "query failed"), None
        return
    logger.info("C-FIND %s level: %d match(es)", query.level, count)


def _instances(
    event: Event, db: Database, models: dict[str, InformationModelValues], file_store: FileStore
) -> list[StoredInstance]:
    query = parse_identifier(event.identifier, _model_of(event, models), db.dialect)
    with db.reader() as session:
        rows = session.execute(retrieve_statement(query)).all()
    return [
        StoredInstance(str(file_store.absolute(row.path)), row.sop_instance_uid) for row in rows
    ]


def _retrieve_refusal(exc: Exception) -> Dataset:
    if isinstance(exc, QueryError):
        logger.warning("retrieve refused: 0x%04X %s", exc.status, exc.comment)
        return _status(exc.status, exc.comment)
    logger.exception("retrieve identifier could not be processed")
    return _status(status.UNABLE_TO_PROCESS, "identifier could not be processed")


def handle_get(
    event: Event,
    db: Database,
    file_store: FileStore,
    models: dict[str, InformationModelValues],
) -> Iterator[Any]:
    """C-GET: send every matching instance back over the same association.

    Yields the number of C-STORE sub-operations, then one stored instance per
    sub-operation; pynetdicom counts completed/failed/warning sub-operations
    and answers Success, Warning 0xB000 (some failed) or Failure 0xA702 (all
    failed), PS3.4 C.4.3.1.4.

    References
    ----------
    PS3.4 C.4.3, https://dicom.nema.org/medical/dicom/current/output/chtml/part04/sect_C.4.3.html
    """
    try:
        instances = _instances(event, db, models, file_store)
    except Exception as exc:
        yield 1  # pynetdicom answers Success to zero sub-operations; one lets us fail
        yield _retrieve_refusal(exc), None
        return
    logger.info("C-GET: %d instance(s)", len(instances))
    yield len(instances)
    for instance in instances:
        if event.is_cancelled:
            yield status.CANCEL, None
            return
        yield status.PENDING, instance


def handle_move(
    event: Event,
    db: Database,
    file_store: FileStore,
    settings: Settings,
    models: dict[str, InformationModelValues],
) -> Iterator[Any]:
    """C-MOVE: send every matching instance to a configured destination AE.

    An unknown Move Destination gets 0xA801 "Move destination unknown". The
    association to the destination proposes one presentation context per
    (SOP Class, stored Transfer Syntax) of the matches, so the stored bytes go
    out unchanged.

    References
    ----------
    PS3.4 C.4.2, https://dicom.nema.org/medical/dicom/current/output/chtml/part04/sect_C.4.2.html
    """
    destination = settings.move_destination(str(event.move_destination).strip())
    if destination is None:
        logger.warning("C-MOVE refused: unknown destination %r", str(event.move_destination))
        yield None, None
        return
    try:
        instances = _instances(event, db, models, file_store)
    except Exception as exc:
        yield destination.host, destination.port, {"ae_title": destination.ae_title}
        yield 1
        yield _retrieve_refusal(exc), None
        return
    contexts = contexts_for(instances)
    yield (
        destination.host,
        destination.port,
        {"contexts": contexts, "ae_title": destination.ae_title},
    )
    logger.info("C-MOVE to %s: %d instance(s)", destination.ae_title, len(instances))
    yield len(instances)
    for instance in instances:
        if event.is_cancelled:
            yield status.CANCEL, None
            return
        yield status.PENDING, instance


def contexts_for(instances: list[StoredInstance]) -> list[PresentationContext]:
    """One presentation context per (SOP Class, Transfer Syntax) of the stored files (≤ 128)."""
    pairs: dict[tuple[str, str], None] = {}
    for instance in instances:
        meta = read_file_meta_info(instance.stored_path)
        pairs[(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))] = None
    if len(pairs) > 128:
        logger.warning("C-MOVE: %d SOP Class/Transfer Syntax pairs, 128 proposed", len(pairs))
    return [build_context(sop, [ts]) for sop, ts in list(pairs)[:128]]
