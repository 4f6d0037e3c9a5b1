"""What happens after a study's triage finished: alerts, key image, forwarding.

Accepts the study and the analysis generation whose job just finished (any
final state: triaged, no applicable model, failed) and acts on it. The
dispatcher (:mod:`archive.dispatch`, through the flow ``flows.triage``) calls
:func:`after_triage` once per finished job, best-effort: an exception here is
logged and never changes the study's triage state. This module is the hook the
worklist engineer fills in; until then it does nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from archive.config import Settings
    from archive.db import Database
    from archive.ingest import Ingest


def after_triage(
    db: Database,
    study_pk: int,
    generation: int,
    *,
    settings: Settings,
    ingest: Ingest | None = None,
    now: datetime | None = None,
) -> None:
    """Act on a finished triage job (placeholder: does nothing yet).

    Parameters
    ----------
    db : Database
        The index; the study's row in ``study_triage`` holds the outcome
        (state, priority class/score, failure reason, SR SOP Instance UID).
    study_pk : int
        Primary key of the study (``study.id``).
    generation : int
        The analysis generation that finished; it may already be superseded by
        a newer one (compare with ``study_triage.generation``).
    settings : Settings
        Node settings (alert targets, forwarding destinations...).
    ingest : Ingest | None
        The ingest path, to store derived objects (a key image) into the study.
    now : datetime | None
        The current time (tests pass a fixed clock).

    Returns
    -------
    None
    """
    return None
