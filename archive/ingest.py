"""Ingest: the one code path by which an instance enters the archive.

C-STORE, STOW-RS and the triage flow's own results all come through
:meth:`Ingest.store`. It accepts the encoded bytes of one instance in the DICOM
File Format (PS3.10), checks them (decodable, complete, valid and consistent
UIDs), writes the file atomically and commits its index row, and returns a
:class:`StoreResult` carrying the DIMSE status to answer with. The result is
Success only once both the file and the row are durable. It never decodes
pixel data and never changes the bytes it was given.
"""

from __future__ import annotations

import io
import logging
import struct
import threading
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import pydicom
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian
from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.exc import IntegrityError

from archive import status
from archive.config import DuplicatePolicyValues
from archive.db import Database, upsert_insert
from archive.index import Instance, Patient, Series, StoreConflict, Study, utcnow
from archive.store import FileStore, StagedFile
from pipeline.uids import InvalidUIDError, validate_uid

logger = logging.getLogger(__name__)

PIXEL_DATA = Tag(0x7FE0, 0x0010)
UNDEFINED_LENGTH = 0xFFFFFFFF
SEQUENCE_DELIMITER_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
SEQUENCE_DELIMITER_BE = b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"


class StoreOutcomeValues(StrEnum):
    """What happened to an instance offered to the archive."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    """Same SOP Instance UID, same bytes: nothing to do (idempotent success)."""
    CONFLICT_KEPT_FIRST = "conflict_kept_first"
    OVERWRITTEN = "overwritten"
    REJECTED = "rejected"


@dataclass(frozen=True)
class StoreResult:
    """The outcome of one store, with the DIMSE status and Error Comment to return."""

    outcome: StoreOutcomeValues
    status: int
    error_comment: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_class_uid: str = ""

    @property
    def ok(self) -> bool:
        """True if the archive holds the instance (success or warning)."""
        return self.outcome is not StoreOutcomeValues.REJECTED


class IngestError(Exception):
    """An instance the archive refuses, with the status and a short Error Comment.

    The comment fits Error Comment (0000,0902), an LO of at most 64 characters,
    and never contains patient data.
    """

    def __init__(self, status_code: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status_code
        self.comment = comment[:64]


_NAME_DELIMITERS = {"^", "="}


class _RawText:
    """Reads string values straight from the raw elements of a freshly read data set.

    pydicom converts an element on first access with validation that costs ~50 us
    per element; the index needs twenty of them per instance, as text. Decoding
    the raw bytes with the data set's Specific Character Set (pydicom's own
    ``decode_bytes``, which handles ISO 2022 escapes) gives the same text.
    """

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.encodings = convert_encodings(ds.get("SpecificCharacterSet") or "ISO_IR 6")

    def text(self, keyword: str, max_length: int) -> str:
        elem = self.ds.get_item(keyword)
        if elem is None:
            return ""
        value = elem.value
        if value is None:
            return ""
        if isinstance(value, bytes):
            text = decode_bytes(value, self.encodings, _NAME_DELIMITERS)
        elif isinstance(value, pydicom.multival.MultiValue):
            text = "\\".join(str(v) for v in value)
        else:
            text = str(value)
        return text.strip("\x00 ")[:max_length]

    def integer(self, keyword: str) -> int | None:
        try:
            text = self.text(keyword, 16)
            return int(text) if text else None
        except ValueError:
            return None  # an IS that is not an integer: tolerated, not indexed


@dataclass(frozen=True)
class InstanceAttributes:
    """The attributes of one instance that the index keeps (see archive.index)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician_name: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    instance_number: int | None

    @classmethod
    def from_dataset(cls, ds: Dataset, transfer_syntax_uid: str) -> InstanceAttributes:
        """Read and validate the indexed attributes of `ds`.

        Raises
        ------
        IngestError
            If a UID the archive needs is missing (A900) or invalid (C001).
        """
        raw = _RawText(ds)
        uids = {}
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            value = raw.text(keyword, 256)
            if not value:
                raise IngestError(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} missing")
            try:
                uids[keyword] = validate_uid(value, keyword)
            except InvalidUIDError as exc:
                raise IngestError(
                    status.CANNOT_UNDERSTAND_INVALID_UID, f"{keyword} not a valid UID"
                ) from exc
        return cls(
            sop_class_uid=uids["SOPClassUID"],
            sop_instance_uid=uids["SOPInstanceUID"],
            study_instance_uid=uids["StudyInstanceUID"],
            series_instance_uid=uids["SeriesInstanceUID"],
            transfer_syntax_uid=transfer_syntax_uid,
            patient_id=raw.text("PatientID", 64),
            issuer_of_patient_id=raw.text("IssuerOfPatientID", 64),
            patient_name=raw.text("PatientName", 324),
            patient_birth_date=raw.text("PatientBirthDate", 8),
            patient_sex=raw.text("PatientSex", 16),
            study_date=raw.text("StudyDate", 8),
            study_time=raw.text("StudyTime", 16),
            accession_number=raw.text("AccessionNumber", 16),
            study_id=raw.text("StudyID", 16),
            study_description=raw.text("StudyDescription", 64),
            referring_physician_name=raw.text("ReferringPhysicianName", 324),
            modality=raw.text("Modality", 16).upper(),
            series_number=raw.integer("SeriesNumber"),
            series_description=raw.text("SeriesDescription", 64),
            body_part_examined=raw.text("BodyPartExamined", 16).upper(),
            instance_number=raw.integer("InstanceNumber"),
        )


def decode_part10(data: bytes) -> Dataset:
    """Decode the structure of a PS3.10 file (no pixel decoding) and prove it complete.

    Raises
    ------
    IngestError
        C000 if the bytes are not a decodable, complete data set.
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except Exception as exc:  # pydicom raises many types; none may escape as a crash
        raise IngestError(status.CANNOT_UNDERSTAND, "data set could not be decoded") from exc
    if len(ds) == 0:
        # pydicom returns nothing at all when a stream ends inside an undefined-length value.
        raise IngestError(status.CANNOT_UNDERSTAND, "data set empty or truncated")
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID")
    if transfer_syntax != DeflatedExplicitVRLittleEndian:  # offsets refer to inflated bytes
        _check_complete(ds, data)
    return ds


def _check_complete(ds: Dataset, data: bytes) -> None:
    """Raise if the data set ends before its last element does.

    pydicom reads a short final value, or an undefined-length value without its
    delimiter, with at most a warning; a truncated transfer would otherwise be
    stored as if whole.
    """
    last = ds.get_item(max(ds._dict))
    value_tell = getattr(last, "value_tell", None)
    length = getattr(last, "length", None)
    if value_tell is None or length is None:
        return  # already converted by pydicom (e.g. Specific Character Set): complete
    if length == UNDEFINED_LENGTH:
        # PS3.5 7.5.2 / A.4: a sequence or encapsulated Pixel Data of undefined
        # length ends with a Sequence Delimitation Item (FFFE,E0DD), length 0.
        delimiter = (
            SEQUENCE_DELIMITER_LE
            if getattr(last, "is_little_endian", True)
            else SEQUENCE_DELIMITER_BE
        )
        if not data.endswith(delimiter):
            raise IngestError(status.CANNOT_UNDERSTAND, "data set truncated (no delimiter)")
        return
    if value_tell + length > len(data):
        raise IngestError(status.CANNOT_UNDERSTAND, "data set truncated")
    if last.tag == PIXEL_DATA:
        _check_native_pixel_length(ds, length)


def _us(ds: Dataset, tag: int, default: int) -> int:
    """An US value read from its raw bytes (pydicom's conversion costs ~50 us)."""
    elem = ds.get_item(tag)
    if elem is None:
        return default
    value = elem.value
    if isinstance(value, bytes):
        if len(value) < 2:
            return default
        fmt = "<H" if getattr(elem, "is_little_endian", True) else ">H"
        return int(struct.unpack(fmt, value[:2])[0])
    return int(value)


def _check_native_pixel_length(ds: Dataset, length: int) -> None:
    """Native Pixel Data must hold Rows x Columns x Samples x Frames values (PS3.5 8.1.1)."""
    try:
        rows = _us(ds, 0x00280010, 0)
        columns = _us(ds, 0x00280011, 0)
        samples = _us(ds, 0x00280002, 1)
        bits = _us(ds, 0x00280100, 0)
        frames_text = _RawText(ds).text("NumberOfFrames", 16)
        frames = int(frames_text) if frames_text else 1
    except (TypeError, ValueError, struct.error):
        return  # cannot tell; decoding later will say
    if bits == 1:
        expected = (rows * columns * samples * frames + 7) // 8
    else:
        expected = rows * columns * samples * frames * (bits // 8)
    if length < expected:
        raise IngestError(status.CANNOT_UNDERSTAND, "Pixel Data shorter than its image size")


class _UidCache:
    """Per-process cache of UID -> primary key for studies and series already indexed."""

    def __init__(self, capacity: int = 4096) -> None:
        self._lock = threading.Lock()
        self._tables: dict[str, dict[str, int]] = {"study": {}, "series": {}}
        self._capacity = capacity

    def get(self, kind: str, uid: str) -> int | None:
        with self._lock:
            return self._tables[kind].get(uid)

    def put(self, kind: str, uid: str, pk: int) -> None:
        with self._lock:
            table = self._tables[kind]
            if len(table) >= self._capacity:
                table.clear()
            table[uid] = pk

    def clear(self) -> None:
        with self._lock:
            for table in self._tables.values():
                table.clear()


class _Statements:
    """The ingest path's SQL, built once per dialect and executed with parameters.

    Building a statement per call costs more than executing it; these are
    compiled once and cached by SQLAlchemy.
    """

    def __init__(self, dialect: str) -> None:
        insert = upsert_insert(dialect)
        patient, study, series, instance = (
            Patient.__table__,
            Study.__table__,
            Series.__table__,
            Instance.__table__,
        )
        self.insert_patient = (
            insert(patient)
            .on_conflict_do_nothing(index_elements=["patient_id", "issuer_of_patient_id"])
            .returning(patient.c.id)
        )
        self.select_patient = select(patient.c.id).where(
            patient.c.patient_id == bindparam("patient_id"),
            patient.c.issuer_of_patient_id == bindparam("issuer_of_patient_id"),
        )
        self.insert_study = (
            insert(study)
            .on_conflict_do_nothing(index_elements=["study_instance_uid"])
            .returning(study.c.id)
        )
        self.select_study = select(study.c.id).where(
            study.c.study_instance_uid == bindparam("study_instance_uid")
        )
        self.insert_series = (
            insert(series)
            .on_conflict_do_nothing(index_elements=["series_instance_uid"])
            .returning(series.c.id)
        )
        self.select_series = select(series.c.id).where(
            series.c.series_instance_uid == bindparam("series_instance_uid")
        )
        self.insert_instance = (
            insert(instance)
            .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
            .returning(instance.c.id)
        )
        self.select_instance = select(instance.c.id, instance.c.sha256, instance.c.path).where(
            instance.c.sop_instance_uid == bindparam("sop_instance_uid")
        )
        self.count_series_instance = (
            update(series)
            .where(series.c.id == bindparam("pk"))
            .values(
                number_of_series_related_instances=series.c.number_of_series_related_instances + 1,
                last_received_at=bindparam("now"),
            )
        )
        self.count_study_instance = (
            update(study)
            .where(study.c.id == bindparam("pk"))
            .values(
                number_of_study_related_instances=study.c.number_of_study_related_instances + 1,
                last_received_at=bindparam("now"),
            )
        )
        self.count_study_instance_internal = (
            update(study)
            .where(study.c.id == bindparam("pk"))
            .values(number_of_study_related_instances=study.c.number_of_study_related_instances + 1)
        )
        self.count_study_series = (
            update(study)
            .where(study.c.id == bindparam("pk"))
            .values(
                number_of_study_related_series=study.c.number_of_study_related_series + 1,
                modalities_in_study=bindparam("modalities"),
            )
        )
        self.series_modalities = (
            select(series.c.modality).where(series.c.study_pk == bindparam("pk")).distinct()
        )
        self.insert_conflict = insert(StoreConflict.__table__)
        self.overwrite_instance = (
            update(instance)
            .where(instance.c.id == bindparam("pk"))
            .values(
                size=bindparam("size"),
                sha256=bindparam("sha256"),
                transfer_syntax_uid=bindparam("transfer_syntax_uid"),
                instance_number=bindparam("instance_number"),
                received_at=bindparam("now"),
                calling_ae_title=bindparam("calling_ae_title"),
                source_address=bindparam("source_address"),
            )
        )


class Ingest:
    """Stores instances: file first, index row second, success only when both are durable.

    Parameters
    ----------
    db : archive.db.Database
        The index.
    store : archive.store.FileStore
        The file store.
    duplicate_policy : DuplicatePolicyValues
        What to do when a stored SOP Instance arrives again with other bytes.
    """

    def __init__(
        self,
        db: Database,
        store: FileStore,
        duplicate_policy: DuplicatePolicyValues = DuplicatePolicyValues.KEEP_FIRST,
    ) -> None:
        self.db = db
        self.file_store = store
        self.duplicate_policy = DuplicatePolicyValues(duplicate_policy)
        self._cache = _UidCache()
        self._sql = _Statements(db.dialect)

    def store(
        self,
        data: bytes,
        *,
        calling_ae_title: str = "",
        source_address: str = "",
        affected_sop_class_uid: str | None = None,
        affected_sop_instance_uid: str | None = None,
        internal: bool = False,
    ) -> StoreResult:
        """Store one instance given as PS3.10 bytes; never raises for bad input.

        Parameters
        ----------
        data : bytes
            The instance in the DICOM File Format (preamble, meta, data set).
        calling_ae_title, source_address : str
            Who sent it (recorded in the index; never logged with patient data).
        affected_sop_class_uid, affected_sop_instance_uid : str, optional
            The C-STORE command's Affected SOP Class/Instance UID; the data set must agree.
        internal : bool
            The archive's own output (an AI result written into the study): stored
            like any instance, but it does not count as an arrival, so it does not
            make the study look incomplete again and trigger a re-analysis.

        Returns
        -------
        StoreResult
            With the status to answer: Success, a Warning for a kept-first
            conflict, or a failure status with an Error Comment.

        References
        ----------
        PS3.4 B.2.3 (C-STORE statuses), PS3.10 7.1 (DICOM File Meta Information).
        """
        try:
            ds = decode_part10(data)
            transfer_syntax_uid = str(ds.file_meta.get("TransferSyntaxUID", ""))
            attrs = InstanceAttributes.from_dataset(ds, transfer_syntax_uid)
            self._check_command(attrs, affected_sop_class_uid, affected_sop_instance_uid)
        except IngestError as exc:
            logger.warning(
                "rejected instance from %r: status 0x%04X %s",
                calling_ae_title,
                exc.status,
                exc.comment,
            )
            return StoreResult(StoreOutcomeValues.REJECTED, exc.status, exc.comment)

        try:
            return self._store_valid(
                data, attrs, calling_ae_title[:16], source_address[:64], internal
            )
        except OSError as exc:
            logger.error(
                "could not write SOP Instance %s: %s", attrs.sop_instance_uid, type(exc).__name__
            )
            return self._result(
                StoreOutcomeValues.REJECTED,
                status.OUT_OF_RESOURCES,
                "file store unavailable",
                attrs,
            )
        except Exception:
            logger.exception("could not index SOP Instance %s", attrs.sop_instance_uid)
            return self._result(
                StoreOutcomeValues.REJECTED, status.OUT_OF_RESOURCES, "index unavailable", attrs
            )

    @staticmethod
    def _check_command(
        attrs: InstanceAttributes, sop_class_uid: str | None, sop_instance_uid: str | None
    ) -> None:
        # PS3.4 B.2.3 / PS3.7 9.1.1.1: the command's Affected SOP Class and Instance
        # UIDs identify the data set; a disagreement means one of them is wrong.
        if sop_class_uid is not None and str(sop_class_uid).strip("\x00 ") != attrs.sop_class_uid:
            raise IngestError(
                status.CANNOT_UNDERSTAND_UID_MISMATCH, "SOPClassUID differs from command"
            )
        if (
            sop_instance_uid is not None
            and str(sop_instance_uid).strip("\x00 ") != attrs.sop_instance_uid
        ):
            raise IngestError(
                status.CANNOT_UNDERSTAND_UID_MISMATCH, "SOPInstanceUID differs from command"
            )

    @staticmethod
    def _result(
        outcome: StoreOutcomeValues, code: int, comment: str, attrs: InstanceAttributes
    ) -> StoreResult:
        return StoreResult(
            outcome,
            code,
            comment,
            attrs.sop_instance_uid,
            attrs.study_instance_uid,
            attrs.series_instance_uid,
            attrs.sop_class_uid,
        )

    def _store_valid(
        self,
        data: bytes,
        attrs: InstanceAttributes,
        calling_ae_title: str,
        source_address: str,
        internal: bool,
    ) -> StoreResult:
        relative_path = FileStore.relative_path(
            attrs.study_instance_uid, attrs.series_instance_uid, attrs.sop_instance_uid
        )
        staged = self.file_store.stage(data)
        sender = {"calling_ae_title": calling_ae_title, "source_address": source_address}
        try:
            for attempt in range(2):
                try:
                    with self.db.write_connection() as conn:
                        return self._index(conn, attrs, staged, relative_path, sender, internal)
                except IntegrityError:
                    # A cached primary key went stale (row removed by another process).
                    self._cache.clear()
                    if attempt:
                        raise
            raise AssertionError("unreachable")
        finally:
            # After a commit the staged file has been renamed away; this only
            # removes it when the store did not happen.
            self.file_store.discard(staged)

    def _index(
        self,
        conn: Connection,
        attrs: InstanceAttributes,
        staged: StagedFile,
        relative_path: str,
        sender: dict[str, str],
        internal: bool = False,
    ) -> StoreResult:
        sql = self._sql
        now = utcnow()
        study_pk, series_pk, new_series = self._series_pk(conn, attrs, now)
        inserted = conn.execute(
            sql.insert_instance,
            {
                "sop_instance_uid": attrs.sop_instance_uid,
                "series_pk": series_pk,
                "sop_class_uid": attrs.sop_class_uid,
                "instance_number": attrs.instance_number,
                "transfer_syntax_uid": attrs.transfer_syntax_uid,
                "path": relative_path,
                "size": staged.size,
                "sha256": staged.sha256,
                "received_at": now,
                **sender,
            },
        ).scalar_one_or_none()
        if inserted is None:
            return self._duplicate(conn, attrs, staged, sender, now)

        conn.execute(sql.count_series_instance, {"pk": series_pk, "now": now})
        if internal:
            conn.execute(sql.count_study_instance_internal, {"pk": study_pk})
        else:
            conn.execute(sql.count_study_instance, {"pk": study_pk, "now": now})
        if new_series:
            modalities = sorted(
                {m for m in conn.execute(sql.series_modalities, {"pk": study_pk}).scalars() if m}
            )
            conn.execute(
                sql.count_study_series, {"pk": study_pk, "modalities": "\\".join(modalities)}
            )
        # Rename last: a crash before this point leaves no visible file and no row;
        # a crash between rename and commit leaves a file the next copy replaces.
        self.file_store.commit(staged, relative_path)
        return self._result(StoreOutcomeValues.STORED, status.SUCCESS, "", attrs)

    def _duplicate(
        self,
        conn: Connection,
        attrs: InstanceAttributes,
        staged: StagedFile,
        sender: dict[str, str],
        now: datetime,
    ) -> StoreResult:
        sql = self._sql
        stored = conn.execute(
            sql.select_instance, {"sop_instance_uid": attrs.sop_instance_uid}
        ).one()
        if stored.sha256 == staged.sha256:
            return self._result(StoreOutcomeValues.DUPLICATE, status.SUCCESS, "", attrs)

        overwrite = self.duplicate_policy is DuplicatePolicyValues.OVERWRITE
        conn.execute(
            sql.insert_conflict,
            {
                "sop_instance_uid": attrs.sop_instance_uid,
                "stored_sha256": stored.sha256,
                "received_sha256": staged.sha256,
                "received_size": staged.size,
                "action": "overwritten" if overwrite else "kept_first",
                "received_at": now,
                **sender,
            },
        )
        if not overwrite:
            logger.warning(
                "SOP Instance %s received again with different content; first copy kept",
                attrs.sop_instance_uid,
            )
            return self._result(
                StoreOutcomeValues.CONFLICT_KEPT_FIRST,
                status.WARNING_ELEMENTS_DISCARDED,
                "duplicate SOP Instance UID, other content: first kept",
                attrs,
            )
        conn.execute(
            sql.overwrite_instance,
            {
                "pk": stored.id,
                "size": staged.size,
                "sha256": staged.sha256,
                "transfer_syntax_uid": attrs.transfer_syntax_uid,
                "instance_number": attrs.instance_number,
                "now": now,
                **sender,
            },
        )
        self.file_store.commit(staged, stored.path)
        logger.warning(
            "SOP Instance %s received again with different content; overwritten",
            attrs.sop_instance_uid,
        )
        return self._result(StoreOutcomeValues.OVERWRITTEN, status.SUCCESS, "", attrs)

    def _series_pk(
        self, conn: Connection, attrs: InstanceAttributes, now: datetime
    ) -> tuple[int, int, bool]:
        """(study pk, series pk, series is new), creating patient/study/series rows as needed."""
        study_pk = self._cache.get("study", attrs.study_instance_uid)
        series_pk = self._cache.get("series", attrs.series_instance_uid)
        if study_pk is not None and series_pk is not None:
            return study_pk, series_pk, False

        sql = self._sql
        if study_pk is None:
            study_pk = self._study_pk(conn, attrs, now)
        series_pk = conn.execute(
            sql.insert_series,
            {
                "series_instance_uid": attrs.series_instance_uid,
                "study_pk": study_pk,
                "modality": attrs.modality,
                "series_number": attrs.series_number,
                "series_description": attrs.series_description,
                "body_part_examined": attrs.body_part_examined,
                "number_of_series_related_instances": 0,
                "last_received_at": now,
            },
        ).scalar_one_or_none()
        new_series = series_pk is not None
        if series_pk is None:
            series_pk = conn.execute(
                sql.select_series, {"series_instance_uid": attrs.series_instance_uid}
            ).scalar_one()
        self._cache.put("series", attrs.series_instance_uid, series_pk)
        return study_pk, series_pk, new_series

    def _study_pk(self, conn: Connection, attrs: InstanceAttributes, now: datetime) -> int:
        sql = self._sql
        identity = {
            "patient_id": attrs.patient_id,
            "issuer_of_patient_id": attrs.issuer_of_patient_id,
        }
        patient_pk = conn.execute(
            sql.insert_patient,
            {
                **identity,
                "patient_name": attrs.patient_name,
                "patient_birth_date": attrs.patient_birth_date,
                "patient_sex": attrs.patient_sex,
            },
        ).scalar_one_or_none()
        if patient_pk is None:
            patient_pk = conn.execute(sql.select_patient, identity).scalar_one()
        study_pk = conn.execute(
            sql.insert_study,
            {
                "study_instance_uid": attrs.study_instance_uid,
                "patient_pk": patient_pk,
                "study_date": attrs.study_date,
                "study_time": attrs.study_time,
                "accession_number": attrs.accession_number,
                "study_id": attrs.study_id,
                "study_description": attrs.study_description,
                "referring_physician_name": attrs.referring_physician_name,
                "modalities_in_study": "",
                "number_of_study_related_series": 0,
                "number_of_study_related_instances": 0,
                "first_received_at": now,
                "last_received_at": now,
            },
        ).scalar_one_or_none()
        if study_pk is None:
            study_pk = conn.execute(
                sql.select_study, {"study_instance_uid": attrs.study_instance_uid}
            ).scalar_one()
        self._cache.put("study", attrs.study_instance_uid, study_pk)
        return study_pk
