"""Study completeness: decide when a study has stopped arriving and is ready for triage.

DICOM has no "study complete" message. A study is ready when no instance of it
has arrived for a quiet period (``stable_after_seconds``), or for a much
shorter one (``stable_after_release_seconds``) once every association that
delivered it has been released and no other association is sending it: a
released association is the best sign a sender gives that it is done (the
same idea as Orthanc's stable-study event and mercure's series completion,
with the release as an early signal). Accepts worker reports of associations
and the index; produces "ready" decisions recorded by :mod:`archive.triage`.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from archive.db import Database
from archive.index import utcnow
from archive.triage import StableCandidate, mark_ready, stable_candidates

logger = logging.getLogger(__name__)


class DeliveryTracker:
    """Which associations are delivering which studies, from the DIMSE workers' reports.

    Reports are dictionaries: ``{"type": "delivering", "association": id,
    "study": uid}`` when an association stores its first instance of a study,
    and ``{"type": "closed", "association": id, "studies": [uid, ...],
    "released": bool}`` when it ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, set[str]] = defaultdict(set)
        self._released_at: dict[str, datetime] = {}

    def report(self, report: dict[str, Any], now: datetime | None = None) -> None:
        now = now or utcnow()
        kind = report.get("type")
        association = str(report.get("association", ""))
        with self._lock:
            if kind == "delivering":
                study = str(report["study"])
                self._active[study].add(association)
                self._released_at.pop(study, None)
            elif kind in ("closed", "released"):  # both may come for one association
                for study in report.get("studies", []):
                    senders = self._active.get(study)
                    if senders is not None:
                        senders.discard(association)
                        if senders:
                            continue
                        del self._active[study]
                    # Only an orderly release says the sender is done; an abort does not.
                    if report.get("released", False):
                        self._released_at[study] = now

    def sender_done(self, study_instance_uid: str, last_received_at: datetime) -> bool:
        """True if every association that sent the study was released after its last instance."""
        with self._lock:
            if self._active.get(study_instance_uid):
                return False
            released_at = self._released_at.get(study_instance_uid)
            return released_at is not None and released_at >= last_received_at

    def forget(self, study_instance_uid: str) -> None:
        with self._lock:
            self._released_at.pop(study_instance_uid, None)


class StabilityMonitor:
    """Polls the index for studies that became stable and marks them ready.

    Parameters
    ----------
    db : Database
        The index.
    tracker : DeliveryTracker
        Association reports, for the shortened quiet period.
    quiet_seconds : float
        No arrival for this long: the study is complete.
    release_quiet_seconds : float
        The quiet period once every delivering association has been released.
    """

    def __init__(
        self,
        db: Database,
        tracker: DeliveryTracker,
        *,
        quiet_seconds: float,
        release_quiet_seconds: float,
        poll_seconds: float = 0.2,
    ) -> None:
        self.db = db
        self.tracker = tracker
        self.quiet = timedelta(seconds=quiet_seconds)
        self.release_quiet = timedelta(seconds=min(release_quiet_seconds, quiet_seconds))
        self.poll_seconds = poll_seconds
        self._last_scan: datetime | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_ready: list[Any] = []

    def tick(self, now: datetime | None = None) -> list[tuple[StableCandidate, int]]:
        """One scan: mark every stable study ready; return (candidate, generation) pairs."""
        now = now or utcnow()
        # After the first (full) scan, look only at recent arrivals: anything older
        # was either handled or is in the previous scan's window.
        since = (
            None if self._last_scan is None else self._last_scan - self.quiet - timedelta(seconds=5)
        )
        marked = []
        for candidate in stable_candidates(self.db, since=since):
            quiet = (
                self.release_quiet
                if self.tracker.sender_done(
                    candidate.study_instance_uid, candidate.last_received_at
                )
                else self.quiet
            )
            if candidate.last_received_at > now - quiet:
                continue
            generation = mark_ready(self.db, candidate, now)
            if generation is not None:
                self.tracker.forget(candidate.study_instance_uid)
                marked.append((candidate, generation))
        self._last_scan = now
        for candidate, generation in marked:
            for callback in self.on_ready:
                callback(candidate, generation)
        return marked

    def wake(self) -> None:
        """Scan now (e.g. an association was released)."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stability", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                logger.exception("stability scan failed; retrying")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
