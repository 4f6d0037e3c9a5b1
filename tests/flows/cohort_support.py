"""Helpers of the cohort tests and benchmark: an archive filled with synthetic head CT studies."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from archive.config import Settings
from archive.db import Database
from archive.ingest import Ingest
from archive.store import FileStore
from models.phantoms import write_head_ct
from tests.peers import REPO_ROOT


@dataclass
class Archive:
    """An index and file store in a temporary folder (what a node would use)."""

    settings: Settings
    db: Database
    file_store: FileStore
    ingest: Ingest

    @classmethod
    def create(cls, data_dir: Path, database_url: str | None = None, **settings: object) -> Archive:
        data_dir.mkdir(parents=True, exist_ok=True)
        config = Settings(data_dir=data_dir, database_url=database_url, fsync=False, **settings)
        db = Database(config.resolved_database_url, durable=False)
        db.upgrade()
        file_store = FileStore(data_dir, fsync=False)
        return cls(config, db, file_store, Ingest(db, file_store, config.duplicate_policy))

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a ``pacs-triage`` child process working on this archive."""
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "PACS_TRIAGE_DATA_DIR": str(self.settings.data_dir),
            "PACS_TRIAGE_DATABASE_URL": self.settings.resolved_database_url,
            "PACS_TRIAGE_FSYNC": "false",
            "PACS_TRIAGE_MODELS_DIRS": json.dumps([str(p) for p in self.settings.models_dirs]),
        }
        env.update(extra)
        return env

    def add_phantom(
        self,
        work_dir: Path,
        seed: int,
        *,
        positive: bool = False,
        patient_id: str | None = None,
        accession_number: str | None = None,
        study_date: str = "20260101",
        slices: int = 8,
        rows: int = 32,
    ) -> str:
        """Write one synthetic head CT study and store it as C-STORE would; returns its UID."""
        files = write_head_ct(
            work_dir / f"phantom-{seed}",
            positive=positive,
            seed=seed,
            patient_id=patient_id or f"PAT{seed:05d}",
            accession_number=accession_number,
            study_date=study_date,
            slices=slices,
            rows=rows,
        )
        for path in files:
            data = path.read_bytes()
            result = self.ingest.store(data, calling_ae_title="TEST")
            assert result.ok, result
        import pydicom

        study_instance_uid = str(
            pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        )
        return study_instance_uid


def cli(*args: str) -> list[str]:
    """The command line of ``pacs-triage`` with `args` (run with this interpreter)."""
    return [sys.executable, "-m", "archive.cli", *args]
