"""Forwarding AI results to the hospital PACS: C-STORE (DIMSE) or STOW-RS (DICOMweb).

Accepts an outbox message of kind ``forward`` whose payload lists SOP Instance
UIDs of the study (the SR, the key image and, when the destination asks for
it, the images), reads those files from the store and sends them to the
configured destination it names: by C-STORE as an SCU over one association
(pynetdicom), or by STOW-RS (dicomweb-client). Raises on any failure (no
association, a failure status, an HTTP error) so that :mod:`archive.outbox`
retries the whole message; storing an instance twice is harmless for a
receiver, which keeps one copy per SOP Instance UID.

References
----------
PS3.4 B.2 Storage Service Class (C-STORE statuses, B.2.3);
PS3.7 9.1.1 C-STORE service; PS3.18 10.5 Store Transaction (STOW-RS).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.presentation import build_context
from sqlalchemy import select

from archive.config import DicomwebDestination, ForwardDestination
from archive.index import Instance
from archive.outbox import DeliveryContext, DeliveryError, OutboxMessage, _target_of

logger = logging.getLogger(__name__)

# PS3.4 B.2.3: Warning statuses (0xB000, 0xB006, 0xB007) still mean "stored".
_STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


def _files(ctx: DeliveryContext, sop_instance_uids: list[str]) -> list[Path]:
    with ctx.db.reader() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.path).where(
                Instance.sop_instance_uid.in_(sop_instance_uids)
            )
        ).all()
    found = {uid: path for uid, path in rows}
    missing = [uid for uid in sop_instance_uids if uid not in found]
    if missing:
        raise DeliveryError(f"{len(missing)} instance(s) to forward are not in the archive")
    return [ctx.file_store.absolute(found[uid]) for uid in sop_instance_uids]


def send_dimse(message: OutboxMessage, ctx: DeliveryContext) -> None:
    """C-STORE every listed instance to the destination AE over one association."""
    destination: ForwardDestination = _target_of(
        ctx.settings.forward_destinations, message.target_name
    )
    datasets = [pydicom.dcmread(path) for path in _files(ctx, message.payload["instances"])]
    ae = AE(ae_title=ctx.settings.ae_title)
    ae.acse_timeout = ctx.settings.delivery_timeout_seconds
    ae.network_timeout = ctx.settings.delivery_timeout_seconds
    contexts = {}
    for ds in datasets:
        key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        contexts[key] = build_context(*key)
    if len(contexts) > 128:
        raise DeliveryError("too many presentation contexts for one association")
    ae.requested_contexts = list(contexts.values())
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise DeliveryError(
            f"no association with {destination.ae_title}@{destination.host}:{destination.port}"
        )
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.Status) if "Status" in status else None
            if code not in _STORED_STATUSES:
                raise DeliveryError(
                    f"C-STORE of {ds.SOPInstanceUID} answered "
                    + (f"0x{code:04X}" if code is not None else "no status")
                )
    finally:
        assoc.release()


def send_stow(message: OutboxMessage, ctx: DeliveryContext) -> None:
    """STOW-RS every listed instance to the destination's ``/studies`` resource."""
    from dicomweb_client.api import DICOMwebClient

    destination: DicomwebDestination = _target_of(
        ctx.settings.forward_dicomweb, message.target_name
    )
    datasets = [pydicom.dcmread(path) for path in _files(ctx, message.payload["instances"])]
    client = DICOMwebClient(destination.url, headers=dict(destination.headers))
    try:
        answer = client.store_instances(datasets)
    except Exception as exc:  # requests' HTTPError carries the status code
        raise DeliveryError(f"STOW-RS failed: {type(exc).__name__}: {exc}"[:300]) from None
    failed = answer.get("FailedSOPSequence") if answer is not None else None
    if failed:
        raise DeliveryError(f"STOW-RS: {len(failed)} instance(s) refused")
