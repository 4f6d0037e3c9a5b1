"""The DIMSE service: Application Entity, presentation contexts, handler bindings, transport.

Builds the pynetdicom Application Entity of the node and binds every event
handler in one list. Adds what a stock pynetdicom acceptor lacks on a busy
network: the caller allow-list check at association time (A-ASSOCIATE-RJ,
PS3.8 9.3.4), TCP_NODELAY and TCP_QUICKACK so that stock senders (which leave
Nagle on) are not held up by delayed ACKs, and larger reads per PDU. It also
provides a server that serves connections accepted elsewhere (handed over by
the node's acceptor process), so several worker processes can share one port.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)
from pynetdicom.utils import make_target

from archive import handlers
from archive.config import Settings
from archive.ingest import Ingest
from archive.query import InformationModelValues

logger = logging.getLogger(__name__)

# Accept every storage SOP class, private and unknown ones too, in the
# transfer syntax the sender proposes first (we store bytes, never transcode).
_config.UNRESTRICTED_STORAGE_SERVICE = True
# pynetdicom's standard handlers log every PDU and DIMSE message; at our rates
# that costs more than the store itself.
_config.LOG_HANDLER_LEVEL = "none"

# PS3.8 9.3.4: result 1 rejected-permanent, source 1 service-user,
# reason 3 calling-AE-title-not-recognized.
REJECT_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
REASON_CALLING_AE_NOT_RECOGNIZED = 0x03

# C-GET/C-MOVE send stored files by path: the data set bytes go out as stored.
_config.STORE_SEND_CHUNKED_DATASET = True

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)

QUERY_MODELS: dict[str, InformationModelValues] = {
    PatientRootQueryRetrieveInformationModelFind: InformationModelValues.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelMove: InformationModelValues.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelGet: InformationModelValues.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: InformationModelValues.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelMove: InformationModelValues.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelGet: InformationModelValues.STUDY_ROOT,
}
"""The Query/Retrieve SOP Classes the node supports and their information models (PS3.4 C.6)."""

_send_c_store = Association.send_c_store
UNCOMPRESSED_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)


def send_stored_bytes(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Any:
    """``Association.send_c_store`` that sends a :class:`handlers.StoredInstance` from its file.

    pynetdicom's C-GET and C-MOVE service loops accept only a Dataset from the
    handler and would re-encode it; a stored instance must leave byte for byte
    as it was received, so its file is handed to ``send_c_store`` by path (with
    ``STORE_SEND_CHUNKED_DATASET``, pynetdicom streams the file's data set
    without decoding it).

    Only when the peer accepted no context in the stored transfer syntax, and
    that syntax is an uncompressed one, is the data set decoded and sent in an
    uncompressed syntax the peer did accept (PS3.5 A.1/A.2: the same values,
    another encoding; pixel data are never decompressed or compressed).
    """
    if not isinstance(dataset, handlers.StoredInstance):
        return _send_c_store(self, dataset, *args, **kwargs)
    path = dataset.stored_path
    try:
        return _send_c_store(self, path, *args, **kwargs)
    except ValueError:
        stored_syntax = pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID
        if stored_syntax not in UNCOMPRESSED_SYNTAXES:
            raise
        logger.info(
            "SOP Instance %s: no context in %s accepted, sent in another uncompressed syntax",
            dataset.SOPInstanceUID,
            stored_syntax,
        )
        return _send_c_store(self, pydicom.dcmread(path), *args, **kwargs)


Association.send_c_store = send_stored_bytes  # type: ignore[method-assign]

CallerPolicy = Callable[[str, str], bool]


def tune_socket(sock: socket.socket) -> None:
    """Set the TCP options a DICOM receiver needs (see module docstring)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _QUICKACK is not None:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
    except OSError:
        pass


class TunedAssociationSocket(AssociationSocket):
    """An AssociationSocket that reads a PDU in few system calls and ACKs at once."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        nr_read = 0
        with memoryview(buffer) as view:
            while nr_read < nr_bytes:
                count = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
                if not count:
                    break  # connection closed: return what arrived, as pynetdicom does
                nr_read += count
                if _QUICKACK is not None:
                    # The kernel drops back to delayed ACKs after a while; re-arm.
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        if nr_read < nr_bytes:
            del buffer[nr_read:]
        return buffer


class WakingDULServiceProvider(DULServiceProvider):
    """A DUL whose reactor sleeps until there is work instead of polling every millisecond.

    pynetdicom's reactor sleeps 1 ms whenever a loop found nothing to do. A
    C-FIND handler produces its responses a little slower than the reactor
    drains them, so the reactor falls idle between two responses and each
    pending response waits for the next poll: about 1 ms per match. This
    reactor waits in ``select`` on the peer's socket and on a wake-up socket
    that :meth:`send_pdu` writes to, so a queued PDU goes out at once, and an
    idle association wakes 100 times a second instead of 1000 (less CPU, no
    busy spinning). Otherwise the loop is pynetdicom's own: DUL state machine,
    ARTIM and idle timers, abort on error.
    """

    IDLE_WAIT = 0.01

    _wake_r: socket.socket
    _wake_w: socket.socket

    @classmethod
    def adopt(cls, dul: DULServiceProvider) -> None:
        """Take over a DUL that pynetdicom constructed (its thread target included)."""
        dul.__class__ = cls
        assert isinstance(dul, cls)
        dul._wake_r, dul._wake_w = socket.socketpair()
        dul._wake_r.setblocking(False)
        dul._wake_w.setblocking(False)
        dul._target = make_target(dul.run_reactor)

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _wait_for_work(self) -> None:
        watched: list[Any] = [self._wake_r]
        sock = self.socket.socket if self.socket is not None else None
        if sock is not None and sock.fileno() >= 0:
            watched.append(sock)
        try:
            readable, _, _ = select.select(watched, [], [], self.IDLE_WAIT)
        except (OSError, ValueError):  # the socket closed under us
            time.sleep(self._run_loop_delay)
            return
        if self._wake_r in readable:
            with contextlib.suppress(OSError):
                self._wake_r.recv(4096)

    def run_reactor(self) -> None:
        """pynetdicom's ``DULServiceProvider.run_reactor``, waiting in :meth:`_wait_for_work`."""
        self._idle_timer.start()
        sleep = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    sleep = True
                if sleep:
                    self._wait_for_work()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception:
                    logger.exception("DUL reactor failed, aborting the association")
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    with contextlib.suppress(Exception):
                        assert self.socket is not None
                        self.socket.send(abort_pdu.encode())
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    sleep = True
                    continue
                self.state_machine.do_action(event)
                sleep = False
        finally:
            self._wake_r.close()
            self._wake_w.close()


class AllowListACSE(ACSE):
    """ACSE that admits only callers the node's policy allows (PS3.8 9.3.4)."""

    def _negotiate_as_acceptor(self) -> None:
        policy: CallerPolicy | None = getattr(self.assoc.ae, "caller_policy", None)
        calling_ae_title = self.requestor.primitive.calling_ae_title
        address = self.assoc.requestor.address
        if policy is not None and not policy(calling_ae_title, address):
            self.requestor.ae_title = calling_ae_title
            logger.warning(
                "association rejected: calling AE %r from %s is not allowed",
                calling_ae_title,
                address,
            )
            self.send_reject(
                REJECT_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLING_AE_NOT_RECOGNIZED
            )
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        super()._negotiate_as_acceptor()


class TunedRequestHandler(RequestHandler):
    """Creates acceptor associations with the tuned socket and the allow-list ACSE."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # Same objects, subclass behaviour: pynetdicom builds these inside
        # Association and offers no factory hook.
        assoc.dul.socket.__class__ = TunedAssociationSocket
        assoc.acse.__class__ = AllowListACSE
        WakingDULServiceProvider.adopt(assoc.dul)
        return assoc


class HandoffServer(ThreadedAssociationServer):
    """Serves connections accepted by another process; binds no socket of its own.

    Call :meth:`serve_connection` with each accepted socket.
    """

    daemon_threads = True
    block_on_close = False

    def server_bind(self) -> None:  # the acceptor process owns the listening socket
        pass

    def server_activate(self) -> None:
        pass

    def serve_connection(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Run an association on an accepted socket in a new thread."""
        self.process_request(sock, address)


class ListeningServer(ThreadedAssociationServer):
    """A server that binds and accepts itself (used by single-process nodes and tests)."""

    daemon_threads = True
    block_on_close = False

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        tune_socket(sock)
        return sock, address


ReportCallback = Callable[[dict[str, Any]], None]


def event_handlers(
    ingest: Ingest, on_report: ReportCallback | None = None, settings: Settings | None = None
) -> list[tuple[Any, Callable[..., Any]]]:
    """Every DIMSE event handler of the node, bound to its dependencies."""
    settings = settings or Settings()
    db, file_store = ingest.db, ingest.file_store
    bindings: list[tuple[Any, Callable[..., Any]]] = [
        (evt.EVT_C_ECHO, handlers.handle_echo),
        (evt.EVT_C_STORE, partial(handlers.handle_store, ingest=ingest, on_report=on_report)),
        (evt.EVT_C_FIND, partial(handlers.handle_find, db=db, models=QUERY_MODELS)),
        (
            evt.EVT_C_GET,
            partial(handlers.handle_get, db=db, file_store=file_store, models=QUERY_MODELS),
        ),
        (
            evt.EVT_C_MOVE,
            partial(
                handlers.handle_move,
                db=db,
                file_store=file_store,
                settings=settings,
                models=QUERY_MODELS,
            ),
        ),
    ]
    if on_report is not None:
        closed = partial(handlers.handle_connection_closed, on_report=on_report)
        # EVT_RELEASED too: pynetdicom sends the A-RELEASE-RP before it sets
        # is_released, so a sender that closes at once can make EVT_CONN_CLOSE
        # (another thread) report an orderly release as "not released".
        bindings.extend([(evt.EVT_RELEASED, closed), (evt.EVT_CONN_CLOSE, closed)])
    return bindings


def build_ae(settings: Settings) -> AE:
    """The node's Application Entity with its timeouts, PDU size and contexts."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.maximum_pdu_size
    ae.maximum_associations = settings.maximum_associations
    ae.network_timeout = settings.network_timeout
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.require_called_aet = False
    ae.caller_policy = settings.caller_allowed  # read by AllowListACSE
    ae.add_supported_context(Verification)
    for sop_class in QUERY_MODELS:
        ae.add_supported_context(sop_class)
    return ae


def make_handoff_server(
    ae: AE, settings: Settings, ingest: Ingest, on_report: ReportCallback | None = None
) -> HandoffServer:
    """A server for a worker process that receives accepted sockets from the acceptor."""
    server = HandoffServer(
        ae,
        (settings.dicom_host, settings.dicom_port),
        ae.ae_title,
        ae.supported_contexts,
        evt_handlers=event_handlers(ingest, on_report, settings),
        request_handler=TunedRequestHandler,
    )
    server.socket.close()  # created by TCPServer, never bound
    ae._servers.append(server)  # so AE.active_associations (and its limit) count them
    return server


def start_listening_server(
    settings: Settings, ingest: Ingest, on_report: ReportCallback | None = None
) -> ListeningServer:
    """Start a single-process DIMSE server on (dicom_host, dicom_port) in background threads."""
    ae = build_ae(settings)
    server = ListeningServer(
        ae,
        (settings.dicom_host, settings.dicom_port),
        ae.ae_title,
        ae.supported_contexts,
        evt_handlers=event_handlers(ingest, on_report, settings),
        request_handler=TunedRequestHandler,
    )
    ae._servers.append(server)
    thread = threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True)
    thread.start()
    return server
