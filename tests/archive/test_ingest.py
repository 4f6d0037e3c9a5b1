"""Ingest: what the index and the disk hold after each kind of offered instance.

Runs on SQLite and on PostgreSQL (the ``db`` fixture is parametrized).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from archive import status
from archive.config import DuplicatePolicyValues
from archive.db import Database
from archive.index import Instance, Patient, Series, StoreConflict, Study
from archive.ingest import Ingest, StoreOutcomeValues
from archive.store import FileStore
from tests.dicom_factory import ct_dataset, part10_bytes


def files_on_disk(store: FileStore) -> list[Path]:
    return sorted(p for p in store.files_dir.rglob("*") if p.is_file())


def count(db: Database, table: type) -> int:
    with db.reader() as session:
        return session.scalar(select(func.count()).select_from(table))


@pytest.fixture
def file_store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


@pytest.fixture
def ingest(db: Database, file_store: FileStore) -> Ingest:
    return Ingest(db, file_store)


class TestIngestStore:
    def test_store_writes_file_and_index_rows_matching_tags(
        self, ingest: Ingest, db: Database, file_store: FileStore, ct_series_files: list[Path]
    ) -> None:
        data = ct_series_files[0].read_bytes()
        result = ingest.store(data, calling_ae_title="CT1", source_address="127.0.0.1")

        assert result.outcome is StoreOutcomeValues.STORED
        assert result.status == status.SUCCESS
        ds = pydicom.dcmread(ct_series_files[0])
        with db.reader() as session:
            instance = session.scalars(select(Instance)).one()
            series = instance.series
            study = series.study
            patient = study.patient
            assert instance.sop_instance_uid == ds.SOPInstanceUID
            assert instance.sop_class_uid == ds.SOPClassUID
            assert instance.instance_number == ds.InstanceNumber
            assert instance.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
            assert instance.calling_ae_title == "CT1"
            assert instance.size == len(data)
            assert instance.sha256 == hashlib.sha256(data).hexdigest()
            assert series.series_instance_uid == ds.SeriesInstanceUID
            assert series.modality == ds.Modality
            assert series.series_number == ds.SeriesNumber
            assert series.series_description == ds.SeriesDescription
            assert series.body_part_examined == ds.BodyPartExamined
            assert series.number_of_series_related_instances == 1
            assert study.study_instance_uid == ds.StudyInstanceUID
            assert study.study_date == ds.StudyDate
            assert study.study_time == ds.StudyTime
            assert study.study_description == ds.StudyDescription
            assert study.modalities_in_study == "CT"
            assert study.number_of_study_related_instances == 1
            assert patient.patient_id == ds.PatientID
            assert patient.patient_name == str(ds.PatientName)
            assert patient.patient_sex == ds.PatientSex
        stored = file_store.absolute(instance.path)
        assert stored.read_bytes() == data
        assert list(file_store.tmp_dir.iterdir()) == []

    def test_store_counts_series_and_modalities_of_a_study(
        self, ingest: Ingest, db: Database
    ) -> None:
        study_uid = generate_uid()
        ct_series, sr_series = generate_uid(), generate_uid()
        for i in range(3):
            ds = ct_dataset(study_instance_uid=study_uid, series_instance_uid=ct_series, seed=i)
            assert ingest.store(part10_bytes(ds)).status == status.SUCCESS
        other = ct_dataset(
            study_instance_uid=study_uid, series_instance_uid=sr_series, modality="MR"
        )
        assert ingest.store(part10_bytes(other)).status == status.SUCCESS
        with db.reader() as session:
            study = session.scalars(select(Study)).one()
            assert study.number_of_study_related_instances == 4
            assert study.number_of_study_related_series == 2
            assert study.modalities_in_study == "CT\\MR"
            counts = sorted(
                session.scalars(select(Series.number_of_series_related_instances)).all()
            )
            assert counts == [1, 3]
        assert count(db, Patient) == 1

    def test_store_non_ascii_patient_name_decoded_with_character_set(
        self, ingest: Ingest, db: Database
    ) -> None:
        ds = ct_dataset(patient_name="Müller^Zoë")
        assert ingest.store(part10_bytes(ds)).status == status.SUCCESS
        with db.reader() as session:
            assert session.scalars(select(Patient.patient_name)).one() == "Müller^Zoë"


class TestIngestDuplicates:
    def test_store_duplicate_with_same_bytes_is_idempotent_success(
        self, ingest: Ingest, db: Database, file_store: FileStore
    ) -> None:
        data = part10_bytes(ct_dataset())
        first = ingest.store(data)
        second = ingest.store(data)
        assert first.outcome is StoreOutcomeValues.STORED
        assert second.outcome is StoreOutcomeValues.DUPLICATE
        assert second.status == status.SUCCESS
        assert count(db, Instance) == 1
        assert count(db, StoreConflict) == 0
        with db.reader() as session:
            assert session.scalars(select(Study.number_of_study_related_instances)).one() == 1
        assert len(files_on_disk(file_store)) == 1

    def test_store_duplicate_with_other_bytes_keeps_first(
        self, ingest: Ingest, db: Database, file_store: FileStore
    ) -> None:
        original = ct_dataset(seed=1)
        changed = ct_dataset(
            sop_instance_uid=original.SOPInstanceUID,
            study_instance_uid=original.StudyInstanceUID,
            series_instance_uid=original.SeriesInstanceUID,
            seed=2,
        )
        first_bytes, other_bytes = part10_bytes(original), part10_bytes(changed)
        ingest.store(first_bytes)
        result = ingest.store(other_bytes, calling_ae_title="MR2")

        assert result.outcome is StoreOutcomeValues.CONFLICT_KEPT_FIRST
        assert result.status == status.WARNING_ELEMENTS_DISCARDED
        assert "first kept" in result.error_comment
        [path] = files_on_disk(file_store)
        assert path.read_bytes() == first_bytes
        with db.reader() as session:
            conflict = session.scalars(select(StoreConflict)).one()
            assert conflict.action == "kept_first"
            assert conflict.calling_ae_title == "MR2"
            assert conflict.received_sha256 == hashlib.sha256(other_bytes).hexdigest()
            assert conflict.stored_sha256 == hashlib.sha256(first_bytes).hexdigest()
        assert list(file_store.tmp_dir.iterdir()) == []

    def test_store_duplicate_with_other_bytes_overwrites_when_configured(
        self, db: Database, file_store: FileStore
    ) -> None:
        ingest = Ingest(db, file_store, DuplicatePolicyValues.OVERWRITE)
        original = ct_dataset(seed=1)
        changed = ct_dataset(
            sop_instance_uid=original.SOPInstanceUID,
            study_instance_uid=original.StudyInstanceUID,
            series_instance_uid=original.SeriesInstanceUID,
            seed=2,
        )
        ingest.store(part10_bytes(original))
        result = ingest.store(part10_bytes(changed))
        assert result.outcome is StoreOutcomeValues.OVERWRITTEN
        assert result.status == status.SUCCESS
        [path] = files_on_disk(file_store)
        assert path.read_bytes() == part10_bytes(changed)
        with db.reader() as session:
            assert (
                session.scalars(select(Instance.sha256)).one()
                == hashlib.sha256(part10_bytes(changed)).hexdigest()
            )
            assert session.scalars(select(StoreConflict.action)).one() == "overwritten"


class TestIngestBadInput:
    """Each malformed instance: a precise status, nothing on disk, nothing in the index."""

    def assert_nothing_stored(self, db: Database, file_store: FileStore) -> None:
        assert files_on_disk(file_store) == []
        assert list(file_store.tmp_dir.iterdir()) == []
        for table in (Instance, Series, Study, Patient):
            assert count(db, table) == 0

    def test_truncated_data_set_is_refused(
        self, ingest: Ingest, db: Database, file_store: FileStore
    ) -> None:
        data = part10_bytes(ct_dataset(rows=64, columns=64))
        result = ingest.store(data[:-1000])
        assert result.status == status.CANNOT_UNDERSTAND
        assert result.error_comment == "data set truncated"
        self.assert_nothing_stored(db, file_store)

    def test_truncated_compressed_data_set_is_refused(
        self, ingest: Ingest, db: Database, file_store: FileStore, transfer_syntax_files: list[Path]
    ) -> None:
        jpeg = transfer_syntax_files[4].read_bytes()  # JPEG lossless, encapsulated
        result = ingest.store(jpeg[: len(jpeg) // 2])
        assert result.status == status.CANNOT_UNDERSTAND
        assert "truncated" in result.error_comment
        self.assert_nothing_stored(db, file_store)

    def test_pixel_data_shorter_than_image_is_refused(
        self, ingest: Ingest, db: Database, file_store: FileStore
    ) -> None:
        ds = ct_dataset(rows=32, columns=32)
        ds.PixelData = ds.PixelData[:100]
        result = ingest.store(part10_bytes(ds))
        assert result.status == status.CANNOT_UNDERSTAND
        assert result.error_comment == "Pixel Data shorter than its image size"
        self.assert_nothing_stored(db, file_store)

    def test_garbage_is_refused(self, ingest: Ingest, db: Database, file_store: FileStore) -> None:
        result = ingest.store(b"\x00" * 128 + b"DICM" + b"\xff" * 64)
        assert result.status == status.CANNOT_UNDERSTAND
        self.assert_nothing_stored(db, file_store)

    def test_missing_sop_instance_uid_is_refused(
        self, ingest: Ingest, db: Database, file_store: FileStore
    ) -> None:
        ds = ct_dataset()
        del ds.SOPInstanceUID
        result = ingest.store(part10_bytes(ds))
        assert result.status == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
        assert result.error_comment == "SOPInstanceUID missing"
        self.assert_nothing_stored(db, file_store)

    @pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
    @pytest.mark.parametrize("bad_uid", ["1.2.3/../../x", "1.2.abc", "1." + "9" * 70])
    def test_invalid_uid_is_refused_and_never_reaches_the_disk(
        self, ingest: Ingest, db: Database, file_store: FileStore, keyword: str, bad_uid: str
    ) -> None:
        ds = ct_dataset()
        setattr(ds, keyword, bad_uid)
        result = ingest.store(part10_bytes(ds))
        assert result.status == status.CANNOT_UNDERSTAND_INVALID_UID
        assert result.error_comment == f"{keyword} not a valid UID"
        self.assert_nothing_stored(db, file_store)
        assert not any(file_store.root.parent.rglob("x"))

    def test_uids_disagreeing_with_command_are_refused(
        self, ingest: Ingest, db: Database, file_store: FileStore
    ) -> None:
        ds = ct_dataset()
        result = ingest.store(
            part10_bytes(ds),
            affected_sop_class_uid=ds.SOPClassUID,
            affected_sop_instance_uid=generate_uid(),
        )
        assert result.status == status.CANNOT_UNDERSTAND_UID_MISMATCH
        assert result.error_comment == "SOPInstanceUID differs from command"
        self.assert_nothing_stored(db, file_store)

    def test_sop_class_disagreeing_with_command_is_refused(
        self, ingest: Ingest, db: Database, file_store: FileStore
    ) -> None:
        ds = ct_dataset()
        result = ingest.store(
            part10_bytes(ds),
            affected_sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            affected_sop_instance_uid=ds.SOPInstanceUID,
        )
        assert result.status == status.CANNOT_UNDERSTAND_UID_MISMATCH
        assert result.error_comment == "SOPClassUID differs from command"
        self.assert_nothing_stored(db, file_store)

    def test_unwritable_store_answers_out_of_resources_and_indexes_nothing(
        self, ingest: Ingest, db: Database, file_store: FileStore
    ) -> None:
        # A file where the store's temporary directory should be: every write fails.
        file_store.tmp_dir.rmdir()
        file_store.tmp_dir.write_bytes(b"")
        result = ingest.store(part10_bytes(ct_dataset()))
        assert result.status == status.OUT_OF_RESOURCES
        assert result.error_comment == "file store unavailable"
        for table in (Instance, Series, Study, Patient):
            assert count(db, table) == 0


class TestIngestConcurrency:
    def test_concurrent_stores_of_one_study_keep_exact_counts(
        self, db: Database, file_store: FileStore
    ) -> None:
        study_uid, series_uid = generate_uid(), generate_uid()
        datasets = [
            part10_bytes(
                ct_dataset(study_instance_uid=study_uid, series_instance_uid=series_uid, seed=i)
            )
            for i in range(24)
        ]
        # One Ingest per thread, as each association in a worker has the same one.
        ingest = Ingest(db, file_store)
        results: list[int] = []

        def send(chunk: list[bytes]) -> None:
            for data in chunk:
                results.append(ingest.store(data).status)

        threads = [threading.Thread(target=send, args=(datasets[i::4],)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [status.SUCCESS] * 24
        with db.reader() as session:
            study = session.scalars(select(Study)).one()
            assert study.number_of_study_related_instances == 24
            assert study.number_of_study_related_series == 1
        assert len(files_on_disk(file_store)) == 24
