"""Logging for the node: one format, UIDs and internal ids only, never patient data."""

from __future__ import annotations

import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Configure the root logger once per process; pynetdicom's chatter stays at WARNING."""
    logging.basicConfig(level=level.upper(), format=FORMAT)
    logging.getLogger("pynetdicom").setLevel(
        os.environ.get("PACS_TRIAGE_PYNETDICOM_LOG_LEVEL", "WARNING")
    )
