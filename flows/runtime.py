"""What a triage flow run works with: settings, index, file store, ingest, models.

In embedded mode the node builds one :class:`TriageRuntime` and hands it to
:func:`configure` before it runs flows in-process; in a Prefect worker's flow
run process nothing is configured and :func:`current` builds one from the
environment (``PACS_TRIAGE_*``), the same settings the node reads. Holds no
domain logic.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from importlib import metadata

from archive.analysis import ModelCatalogue, VolumeCache
from archive.config import Settings
from archive.db import Database
from archive.ingest import Ingest
from archive.logs import FORMAT
from archive.store import FileStore

logger = logging.getLogger(__name__)


def software_versions() -> str:
    """Software Versions (0018,1020) written into our reports."""
    try:
        return f"pacs-triage {metadata.version('pacs-triage')}"
    except metadata.PackageNotFoundError:
        return "pacs-triage"


def discover_models(settings: Settings) -> ModelCatalogue:
    """The model registry of the node: shipped bundles plus ``settings.models_dirs``."""
    from models.registry import ModelRegistry, configure_inference, default_model_directories

    # model_threads / model_device: one torch thread by default on a small shared machine.
    device = configure_inference(settings)
    registry = ModelRegistry.discover(default_model_directories(settings), device=device)
    for problem in getattr(registry, "problems", []) or []:
        logger.warning("model bundle skipped: %s", problem)
    return registry


@dataclass
class TriageRuntime:
    """The archive and the models one process's flow runs use."""

    settings: Settings
    db: Database
    file_store: FileStore
    ingest: Ingest
    registry: ModelCatalogue
    volumes: VolumeCache = field(default_factory=VolumeCache)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        registry: ModelCatalogue | None = None,
        *,
        db: Database | None = None,
        file_store: FileStore | None = None,
        ingest: Ingest | None = None,
    ) -> TriageRuntime:
        """Open the archive the settings name (or use the node's own handles where given)."""
        db = db or Database(settings.resolved_database_url, durable=settings.fsync)
        file_store = file_store or FileStore(settings.data_dir, fsync=settings.fsync)
        return cls(
            settings=settings,
            db=db,
            file_store=file_store,
            ingest=ingest or Ingest(db, file_store, settings.duplicate_policy),
            registry=registry if registry is not None else discover_models(settings),
        )


_lock = threading.Lock()
_runtime: TriageRuntime | None = None
PACKAGES = ("archive", "flows", "models", "pipeline")


def _log_like_the_node(level: str) -> None:
    """Our packages' log lines in a Prefect flow run process, in the node's format.

    Prefect configures the root logger of that process (WARNING), so the
    node's ``basicConfig`` would do nothing there.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    for name in PACKAGES:
        package_logger = logging.getLogger(name)
        if not package_logger.handlers:
            package_logger.addHandler(handler)
            package_logger.setLevel(level.upper())
            package_logger.propagate = False


def configure(runtime: TriageRuntime | None) -> None:
    """Use `runtime` for every flow run of this process (None: build from settings again)."""
    global _runtime
    with _lock:
        _runtime = runtime


def current() -> TriageRuntime:
    """The configured runtime, or one built from the environment on first use."""
    global _runtime
    with _lock:
        if _runtime is None:
            # A worker's flow run process: the node's log format and level for our loggers.
            settings = Settings()
            _log_like_the_node(settings.log_level)
            _runtime = TriageRuntime.from_settings(settings)
        return _runtime
