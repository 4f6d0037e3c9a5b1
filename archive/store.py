"""File store: DICOM files on disk, one per SOP Instance, written atomically.

Accepts the encoded bytes of an instance (DICOM File Format, PS3.10) and the
validated UIDs that name it; produces a file under
``<root>/files/<Study UID>/<Series UID>/<SOP Instance UID>.dcm`` and its size and
SHA-256. A file is written to ``<root>/tmp``, fsynced, and only then renamed
into place, so a crash never leaves a half-written file where a reader looks.
It never decodes or changes the bytes it is given, and never builds a path from
an unvalidated UID.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.uids import validate_uid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedFile:
    """A complete, fsynced file in the store's temporary area, not yet visible."""

    temp_path: Path
    size: int
    sha256: str


class FileStore:
    """The on-disk store of DICOM files.

    Parameters
    ----------
    root : pathlib.Path
        Store root; ``files/`` and ``tmp/`` are created beneath it.
    fsync : bool
        fsync files and directories before a write counts as done. Only turn off
        for throwaway nodes (tests of other things, demos).
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.tmp_dir = self.root / "tmp"
        self.fsync = fsync
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def relative_path(
        study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str
    ) -> str:
        """The store-relative path of an instance, from its validated UIDs.

        Raises
        ------
        pipeline.uids.InvalidUIDError
            If any UID is not a valid UID; nothing else can reach the file system.
        """
        study = validate_uid(study_instance_uid, "StudyInstanceUID")
        series = validate_uid(series_instance_uid, "SeriesInstanceUID")
        sop = validate_uid(sop_instance_uid, "SOPInstanceUID")
        return f"{study}/{series}/{sop}.dcm"

    def absolute(self, relative_path: str) -> Path:
        """The absolute path of a store-relative path, refusing anything outside the store."""
        path = (self.files_dir / relative_path).resolve()
        if self.files_dir.resolve() not in path.parents:
            raise ValueError("path lies outside the file store")
        return path

    def stage(self, data: bytes | memoryview) -> StagedFile:
        """Write `data` to a new temporary file and fsync it; return its size and hash."""
        temp_path = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:])
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            temp_path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return StagedFile(temp_path, len(view), hashlib.sha256(view).hexdigest())

    def commit(self, staged: StagedFile, relative_path: str) -> Path:
        """Rename a staged file into place (replacing any file there); make the rename durable."""
        final = self.absolute(relative_path)
        parent = final.parent
        created = not parent.is_dir()
        if created:
            parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged.temp_path, final)
        if self.fsync:
            self._fsync_dir(parent)
            if created:
                # New study/series directories must survive a crash too.
                self._fsync_dir(parent.parent)
                self._fsync_dir(parent.parent.parent)
        return final

    def discard(self, staged: StagedFile) -> None:
        """Remove a staged file that will not be committed."""
        staged.temp_path.unlink(missing_ok=True)

    def read(self, relative_path: str) -> bytes:
        """The bytes of a stored file, exactly as received."""
        return self.absolute(relative_path).read_bytes()

    def sweep_temporary(self) -> int:
        """Delete temporary files left by a crash; return how many were removed."""
        removed = 0
        for entry in self.tmp_dir.iterdir():
            if entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
        if removed:
            logger.warning("removed %d incomplete temporary file(s) left by a crash", removed)
        return removed

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
