"""The model_result table: fingerprints, JSON round trip, idempotent recording, cache lookup."""

from __future__ import annotations

from pathlib import Path

from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from archive.db import Database
from archive.index import ModelResultRecord, Study
from archive.ingest import Ingest
from archive.results import cached_result, record_result, series_fingerprint
from archive.store import FileStore
from pipeline.findings import FindingDefinition, FindingResult, ModelIdentity, ModelResult
from tests.dicom_factory import ct_dataset, part10_bytes

HEMORRHAGE = FindingDefinition("hemorrhage", codes.SCT.IntracranialHemorrhage, "critical", 0.5)
MODEL = ModelIdentity("ich", "1.0.0", "ab" * 32)


def a_study(db: Database, tmp_path: Path) -> int:
    ds = ct_dataset(study_instance_uid=generate_uid())
    assert Ingest(db, FileStore(tmp_path / "store", fsync=False)).store(part10_bytes(ds)).ok
    with db.reader() as session:
        return session.scalars(select(Study.id)).one()


class TestSeriesFingerprint:
    def test_fingerprint_ignores_order_and_sees_any_change(self) -> None:
        instances = [("1.2.3", "aa"), ("1.2.4", "bb")]
        assert series_fingerprint(instances) == series_fingerprint(reversed(instances))
        assert series_fingerprint(instances) != series_fingerprint([*instances, ("1.2.5", "cc")])
        assert series_fingerprint(instances) != series_fingerprint(
            [("1.2.3", "aa"), ("1.2.4", "xx")]
        )


class TestRecordedResults:
    def test_recorded_result_reads_back_with_location_and_is_recorded_once(
        self, db: Database, tmp_path: Path
    ) -> None:
        study_pk = a_study(db, tmp_path)
        result = ModelResult(
            MODEL,
            "1.2.3.4",
            (FindingResult(HEMORRHAGE, 0.83, volume_ml=12.5, location=(1.0, -2.0, 30.5)),),
            inference_seconds=0.4,
        )
        record_result(db, study_pk=study_pk, fingerprint="f" * 64, result=result, mode="active")
        record_result(db, study_pk=study_pk, fingerprint="f" * 64, result=result, mode="active")

        cached = cached_result(
            db,
            series_instance_uid="1.2.3.4",
            fingerprint="f" * 64,
            model=MODEL,
            definitions=(HEMORRHAGE,),
        )
        assert cached is not None and cached.cached and cached.mode == "active"
        [finding] = cached.result.findings
        assert (finding.probability, finding.volume_ml, finding.location) == (
            0.83,
            12.5,
            (1.0, -2.0, 30.5),
        )
        assert finding.present
        with db.reader() as session:
            assert session.scalar(select(func.count()).select_from(ModelResultRecord)) == 1

    def test_other_weights_or_images_are_not_served_from_the_cache(
        self, db: Database, tmp_path: Path
    ) -> None:
        study_pk = a_study(db, tmp_path)
        result = ModelResult(MODEL, "1.2.3.4", (FindingResult(HEMORRHAGE, 0.1),))
        record_result(db, study_pk=study_pk, fingerprint="f" * 64, result=result, mode="shadow")
        retrained = ModelIdentity("ich", "1.0.0", "cd" * 32)
        for model, fingerprint in ((retrained, "f" * 64), (MODEL, "e" * 64)):
            assert (
                cached_result(
                    db,
                    series_instance_uid="1.2.3.4",
                    fingerprint=fingerprint,
                    model=model,
                    definitions=(HEMORRHAGE,),
                )
                is None
            )
