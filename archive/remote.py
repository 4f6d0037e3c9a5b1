"""Pulling a cohort from a remote PACS: C-FIND the studies there, C-MOVE them to this node.

Accepts a remote AE (``settings.cohort_remotes``), study-level filters and
our AE title; produces the list of studies the remote holds that match
(Study Root C-FIND) and moves each of them to our AE title (Study Root
C-MOVE, one study per request, with an optional pause between requests so
the remote is not flooded). The remote must know our AE title as a move
destination (host and port of this node's DICOM service). The instances
arrive through the node's own C-STORE service like any other; this module
never writes to the index. Nothing here logs patient data: Patient ID is
sent as a matching key but never logged.

References
----------
PS3.4 C.4.1 C-FIND and C.4.2 C-MOVE (Query/Retrieve Service Class),
https://dicom.nema.org/medical/dicom/current/output/chtml/part04/sect_C.4.html ;
PS3.4 C.6.2.1 Study Root information model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import select

from archive.cohorts import CohortSelectionError, SelectedStudy, StudyQuery
from archive.config import RemoteAE
from archive.db import Database
from archive.index import Study
from pipeline.uids import InvalidUIDError, validate_uid

logger = logging.getLogger(__name__)

PENDING_STATUSES = (0xFF00, 0xFF01)
"""C-FIND / C-MOVE Pending (PS3.4 C.4.1.1.4 / C.4.2.1.5)."""
SUCCESS = 0x0000
WARNING_SUB_OPERATIONS = 0xB000
"""C-MOVE Warning: sub-operations complete, one or more failures (PS3.4 C.4.2.1.5)."""
MOVE_DESTINATION_UNKNOWN = 0xA801
"""C-MOVE Refused: Move Destination unknown (PS3.4 C.4.2.1.5)."""


class RemoteError(RuntimeError):
    """The remote PACS could not be reached or refused a request; the message says how."""


@dataclass(frozen=True)
class RemoteStudy:
    """A study a remote PACS reported for a C-FIND (Study level)."""

    study_instance_uid: str
    accession_number: str
    study_date: str
    modalities_in_study: tuple[str, ...]
    number_of_study_related_instances: int | None


@dataclass(frozen=True)
class MoveOutcome:
    """How the C-MOVE of one study ended (sub-operation counts from the last response)."""

    study_instance_uid: str
    status: int
    completed: int
    failed: int
    warning: int

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


def _identifiers(query: StudyQuery) -> list[Dataset]:
    """Study Root C-FIND identifiers for `query` (one per listed Patient ID / Accession / Modality).

    Raises
    ------
    ValueError
        A filter a Study-level C-FIND cannot express.
    """
    if query.body_part:
        raise ValueError(
            "body part is a series attribute; a remote Study-level C-FIND cannot filter on it"
        )
    if query.analysed_by or query.not_analysed_by:
        raise ValueError("analysed-by filters apply to this archive only, not to a remote PACS")
    base = Dataset()
    base.QueryRetrieveLevel = "STUDY"
    base.StudyInstanceUID = ""
    base.AccessionNumber = ""
    base.PatientID = ""
    base.ModalitiesInStudy = ""
    base.NumberOfStudyRelatedInstances = ""
    # PS3.4 C.2.2.2.5 range matching on Study Date.
    if query.study_date_from or query.study_date_to:
        base.StudyDate = f"{query.study_date_from or ''}-{query.study_date_to or ''}"
    else:
        base.StudyDate = ""
    # PS3.4 C.2.2.2.4 wild card matching for the description keyword.
    base.StudyDescription = f"*{query.study_description}*" if query.study_description else ""
    identifiers = [base]
    for keyword, values in (
        ("PatientID", query.patient_ids),
        ("AccessionNumber", query.accession_numbers),
        ("ModalitiesInStudy", query.modalities),
    ):
        if values:
            expanded = []
            for ds in identifiers:
                for value in values:
                    copy = Dataset()
                    copy.update(ds)
                    setattr(copy, keyword, value)
                    expanded.append(copy)
            identifiers = expanded
    return identifiers


def _associate(ae: AE, remote: RemoteAE, timeout: float):  # type: ignore[no-untyped-def]
    assoc = ae.associate(remote.host, remote.port, ae_title=remote.ae_title)
    if not assoc.is_established:
        raise RemoteError(
            f"remote {remote.ae_title} at {remote.host}:{remote.port}: association "
            f"{'rejected' if assoc.is_rejected else 'failed'}"
        )
    return assoc


def find_studies(
    remote: RemoteAE,
    query: StudyQuery,
    *,
    calling_ae_title: str,
    timeout: float = 60.0,
) -> list[RemoteStudy]:
    """The studies the remote holds that match `query` (Study Root C-FIND), oldest first.

    Raises
    ------
    ValueError
        A filter a Study-level C-FIND cannot express.
    RemoteError
        No association, or a C-FIND failure status (the status is named).
    """
    identifiers = _identifiers(query)
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    found: dict[str, RemoteStudy] = {}
    assoc = _associate(ae, remote, timeout)
    try:
        for identifier in identifiers:
            for status, answer in assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind
            ):
                if not status:
                    raise RemoteError(f"remote {remote.ae_title}: C-FIND got no response")
                code = int(status.Status)
                if code in PENDING_STATUSES and answer is not None:
                    study = _remote_study(answer)
                    if study is not None:
                        found.setdefault(study.study_instance_uid, study)
                elif code != SUCCESS and code not in PENDING_STATUSES:
                    raise RemoteError(
                        f"remote {remote.ae_title}: C-FIND failed with status 0x{code:04X}"
                    )
    finally:
        assoc.release()
    studies = sorted(found.values(), key=lambda s: (s.study_date, s.study_instance_uid))
    if query.limit:
        studies = studies[: query.limit]
    logger.info("remote %s: C-FIND matched %d studies", remote.ae_title, len(studies))
    return studies


def _remote_study(answer: Dataset) -> RemoteStudy | None:
    try:
        uid = validate_uid(str(answer.get("StudyInstanceUID", "")), "StudyInstanceUID")
    except InvalidUIDError:
        logger.warning("remote C-FIND answer with an invalid StudyInstanceUID ignored")
        return None
    modalities = answer.get("ModalitiesInStudy") or ()
    if isinstance(modalities, str):
        modalities = (modalities,)
    count = answer.get("NumberOfStudyRelatedInstances")
    return RemoteStudy(
        study_instance_uid=uid,
        accession_number=str(answer.get("AccessionNumber", "") or ""),
        study_date=str(answer.get("StudyDate", "") or ""),
        modalities_in_study=tuple(str(m) for m in modalities),
        number_of_study_related_instances=int(count) if count not in (None, "") else None,
    )


def move_studies(
    remote: RemoteAE,
    study_instance_uids: Sequence[str],
    *,
    calling_ae_title: str,
    destination_ae_title: str,
    interval_seconds: float = 0.0,
    timeout: float = 600.0,
    on_progress: Callable[[MoveOutcome], None] | None = None,
) -> list[MoveOutcome]:
    """C-MOVE each study from the remote to `destination_ae_title`, one request per study.

    Raises
    ------
    RemoteError
        No association, or the remote does not know the destination (A801):
        nothing else can succeed then. Other failures are returned per study.
    """
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.network_timeout = 60.0
    ae.dimse_timeout = timeout
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    outcomes: list[MoveOutcome] = []
    assoc = _associate(ae, remote, 60.0)
    try:
        for position, uid in enumerate(study_instance_uids):
            if position and interval_seconds:
                time.sleep(interval_seconds)  # throttle: one study at a time, then a pause
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = validate_uid(uid, "StudyInstanceUID")
            last = (0xFFFF, 0, 0, 0)
            for status, _ in assoc.send_c_move(
                identifier, destination_ae_title, StudyRootQueryRetrieveInformationModelMove
            ):
                if not status:
                    raise RemoteError(f"remote {remote.ae_title}: C-MOVE got no response")
                last = (
                    int(status.Status),
                    int(status.get("NumberOfCompletedSuboperations", 0) or 0),
                    int(status.get("NumberOfFailedSuboperations", 0) or 0),
                    int(status.get("NumberOfWarningSuboperations", 0) or 0),
                )
            if last[0] == MOVE_DESTINATION_UNKNOWN:
                raise RemoteError(
                    f"remote {remote.ae_title} does not know move destination "
                    f"{destination_ae_title!r} (status 0xA801); add this node's AE title, "
                    "host and port to the remote's known modalities"
                )
            outcome = MoveOutcome(uid, *last)
            if not outcome.ok:
                logger.warning(
                    "remote %s: C-MOVE of study %s ended with status 0x%04X "
                    "(%d completed, %d failed)",
                    remote.ae_title,
                    uid,
                    outcome.status,
                    outcome.completed,
                    outcome.failed,
                )
            outcomes.append(outcome)
            if on_progress is not None:
                on_progress(outcome)
    finally:
        assoc.release()
    return outcomes


def remote_by_title(remotes: Sequence[RemoteAE], ae_title: str) -> RemoteAE:
    """The configured remote with `ae_title`.

    Raises
    ------
    LookupError
        None is configured (the message lists those that are).
    """
    for remote in remotes:
        if remote.ae_title.strip() == ae_title.strip():
            return remote
    known = ", ".join(r.ae_title for r in remotes) or "none"
    raise LookupError(f"no remote PACS {ae_title!r} in cohort_remotes (configured: {known})")


def pull_studies(
    db: Database,
    remote: RemoteAE,
    query: StudyQuery,
    *,
    calling_ae_title: str,
    destination_ae_title: str,
    interval_seconds: float = 0.0,
    on_progress: Callable[[MoveOutcome], None] | None = None,
) -> tuple[list[SelectedStudy], list[MoveOutcome]]:
    """Find the matching studies on the remote, move them here, and select them in the index.

    Returns the studies now in this archive (in the remote's order) and the
    outcome of every C-MOVE. A study whose move failed completely is left out
    (its outcome says why); one that arrived in part is kept.

    Raises
    ------
    RemoteError
        As :func:`find_studies` and :func:`move_studies`.
    CohortSelectionError
        Nothing matched on the remote, or nothing arrived.
    """
    found = find_studies(remote, query, calling_ae_title=calling_ae_title)
    if not found:
        raise CohortSelectionError(f"remote {remote.ae_title}: no study matches the query")
    outcomes = move_studies(
        remote,
        [s.study_instance_uid for s in found],
        calling_ae_title=calling_ae_title,
        destination_ae_title=destination_ae_title,
        interval_seconds=interval_seconds,
        on_progress=on_progress,
    )
    arrived = [o.study_instance_uid for o in outcomes if o.completed or o.ok]
    with db.reader() as session:
        present = dict(
            session.execute(
                select(Study.study_instance_uid, Study.id).where(
                    Study.study_instance_uid.in_(arrived)
                )
            ).all()
        )
    selected = [SelectedStudy(present[uid], uid) for uid in arrived if uid in present]
    if not selected:
        raise CohortSelectionError(
            f"remote {remote.ae_title}: {len(found)} studies matched but none arrived here "
            f"(does it know {destination_ae_title!r} as a move destination, with this node's "
            "host and port?)"
        )
    return selected, outcomes
