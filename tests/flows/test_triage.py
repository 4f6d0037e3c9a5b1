"""The triage flow in-process against a real Prefect server, on SQLite and PostgreSQL.

Studies are stored through the real ingest path, made ready through the real
outbox, and analysed by real MONAI bundles (``models.testing.make_bundle``)
on synthetic head CTs (``models.phantoms.write_head_ct``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1, generate_uid
from sqlalchemy import select

from archive.config import Settings
from archive.db import Database
from archive.index import Instance, ModelResultRecord, Series, Study, StudyTriage, TriageJob
from archive.ingest import Ingest
from archive.store import FileStore
from archive.triage import (
    ClaimedJob,
    TriageStateValues,
    claim_next_job,
    mark_ready,
    stable_candidates,
)
from flows import runtime
from flows.triage import triage_study
from models.phantoms import write_head_ct
from models.registry import ModelRegistry
from models.testing import make_bundle
from pipeline import codes as triage_codes
from pipeline.report import SR_SERIES_NUMBER
from tests.dicom_factory import ct_dataset, part10_bytes

HEAD_RULE = {"modality": ["CT"], "body_part": ["HEAD"], "body_part_keywords": ["HEAD"]}


class Archive:
    """A real index and file store with the triage runtime pointing at them."""

    def __init__(self, db: Database, root: Path, models_dir: Path) -> None:
        self.db = db
        self.models_dir = models_dir
        self.settings = Settings(data_dir=root, database_url=db.url, fsync=False)
        self.file_store = FileStore(root, fsync=False)
        self.ingest = Ingest(db, self.file_store)

    def use_models(self) -> None:
        registry = ModelRegistry.discover([self.models_dir])
        runtime.configure(
            runtime.TriageRuntime.from_settings(
                self.settings, registry, db=self.db, file_store=self.file_store, ingest=self.ingest
            )
        )

    def store_files(self, paths: list[Path]) -> str:
        study_uids = set()
        for path in paths:
            result = self.ingest.store(Path(path).read_bytes(), calling_ae_title="TEST")
            assert result.ok, result.error_comment
            study_uids.add(result.study_instance_uid)
        assert len(study_uids) == 1
        return study_uids.pop()

    def store_datasets(self, datasets: list[pydicom.Dataset]) -> str:
        for ds in datasets:
            result = self.ingest.store(part10_bytes(ds), calling_ae_title="TEST")
            assert result.ok, result.error_comment
        return str(datasets[0].StudyInstanceUID)

    def ready(self, study_instance_uid: str) -> ClaimedJob:
        """Mark the study ready (as the stability monitor would) and claim its job."""
        for candidate in stable_candidates(self.db, since=None):
            if candidate.study_instance_uid == study_instance_uid:
                assert mark_ready(self.db, candidate) is not None
        job = claim_next_job(self.db, "test-node", lease_seconds=600)
        assert job is not None and job.study_instance_uid == study_instance_uid
        return job

    def triage(self, study_instance_uid: str) -> dict[str, Any]:
        self.use_models()
        job = self.ready(study_instance_uid)
        return asyncio.run(triage_study(job.id))

    def state(self, study_instance_uid: str) -> StudyTriage:
        with self.db.reader() as session:
            return session.scalars(
                select(StudyTriage)
                .join(Study)
                .where(Study.study_instance_uid == study_instance_uid)
            ).one()

    def reports(self, study_instance_uid: str) -> list[pydicom.Dataset]:
        with self.db.reader() as session:
            paths = session.scalars(
                select(Instance.path)
                .join(Series)
                .join(Study)
                .where(Study.study_instance_uid == study_instance_uid, Series.modality == "SR")
                .order_by(Instance.instance_number)
            ).all()
        return [pydicom.dcmread(self.file_store.absolute(p)) for p in paths]

    def model_results(self) -> list[ModelResultRecord]:
        with self.db.reader() as session:
            return list(session.scalars(select(ModelResultRecord).order_by(ModelResultRecord.id)))


@pytest.fixture
def archive(db: Database, tmp_path: Path, prefect_api: str) -> Iterator[Archive]:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    yield Archive(db, tmp_path / "node", models_dir)
    runtime.configure(None)


@pytest.fixture(scope="module")
def head_ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_head_ct(
        tmp_path_factory.mktemp("head"), positive=True, seed=1, patient_id="PH-1", slices=24
    )


def fresh_copy(paths: list[Path], directory: Path) -> list[pydicom.Dataset]:
    """The phantom series with new Study/Series/SOP Instance UIDs (one study per test)."""
    study, series = generate_uid(), generate_uid()
    datasets = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        datasets.append(ds)
    return datasets


def evaluations(sr: pydicom.Dataset) -> dict[str, str]:
    """Study-level qualitative evaluations of our report: concept meaning -> value meaning."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    found = {}
    for item in report.ContentSequence:
        if item.ValueType == "CONTAINER":
            for child in item.get("ContentSequence", []):
                if child.ValueType == "CODE":
                    found[child.ConceptNameCodeSequence[0].CodeMeaning] = child.ConceptCodeSequence[
                        0
                    ].CodeMeaning
                elif child.ValueType == "TEXT":
                    found[child.ConceptNameCodeSequence[0].CodeMeaning] = child.TextValue
    return found


class TestTriageStudy:
    def test_head_ct_with_critical_finding_is_triaged_stat_with_sr(
        self, archive: Archive, head_ct: list[Path], tmp_path: Path
    ) -> None:
        make_bundle(archive.models_dir, name="ich-test", version="1.0.0", probability=0.95)
        study_uid = archive.store_datasets(fresh_copy(head_ct, tmp_path))

        outcome = archive.triage(study_uid)

        state = archive.state(study_uid)
        assert state.state == TriageStateValues.TRIAGED, state.failure_reason
        assert state.priority_class == "STAT"
        assert state.priority_score is not None and state.priority_score >= 80
        assert outcome["state"] == "triaged"
        [sr] = archive.reports(study_uid)
        assert sr.SOPInstanceUID == state.sr_sop_instance_uid
        assert sr.StudyInstanceUID == study_uid
        assert sr.SeriesNumber == SR_SERIES_NUMBER
        assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
        report = hd.sr.Comprehensive3DSR.from_dataset(sr)
        groups = report.content.get_planar_roi_measurement_groups() + list(
            hd.sr.utils.find_content_items(
                report, name=pydicom.sr.codedict.codes.DCM.MeasurementGroup, recursive=True
            )
        )
        assert groups, "the report has no measurement group"
        probabilities = [
            float(item.MeasuredValueSequence[0].NumericValue)
            for item in hd.sr.utils.find_content_items(
                report, name=triage_codes.AI_FINDING_PROBABILITY, recursive=True
            )
        ]
        assert probabilities == [pytest.approx(0.95, abs=1e-3)]
        assert evaluations(sr)["Triage priority"] == "STAT triage priority"
        [row] = archive.model_results()
        assert (row.model_name, row.model_version, row.mode) == ("ich-test", "1.0.0", "active")
        assert json.loads(row.findings)[0]["probability"] == pytest.approx(0.95, abs=1e-3)

    def test_rerun_of_a_job_reuses_the_model_result_and_stores_nothing_twice(
        self, archive: Archive, head_ct: list[Path], tmp_path: Path
    ) -> None:
        make_bundle(archive.models_dir, name="ich-test", version="1.0.0", probability=0.2)
        study_uid = archive.store_datasets(fresh_copy(head_ct, tmp_path))
        archive.use_models()
        job = archive.ready(study_uid)
        first = asyncio.run(triage_study(job.id))

        # The same job again, as after a crash between "stored" and "finished".
        second = asyncio.run(triage_study(job.id))

        assert (first["cached_results"], second["cached_results"]) == (0, 1)
        assert len(archive.model_results()) == 1
        assert len(archive.reports(study_uid)) == 1
        assert archive.state(study_uid).state == TriageStateValues.TRIAGED

    def test_late_instance_is_analysed_again_with_a_new_result(
        self, archive: Archive, head_ct: list[Path], tmp_path: Path
    ) -> None:
        make_bundle(archive.models_dir, name="ich-test", version="1.0.0", probability=0.2)
        datasets = fresh_copy(head_ct, tmp_path)
        study_uid = archive.store_datasets(datasets[:-1])
        archive.triage(study_uid)

        archive.store_datasets(datasets[-1:])
        archive.triage(study_uid)

        rows = archive.model_results()
        assert len(rows) == 2
        assert rows[0].series_fingerprint != rows[1].series_fingerprint
        assert [int(r.InstanceNumber) for r in archive.reports(study_uid)] == [1, 2]
        assert archive.state(study_uid).generation == 2

    def test_newest_generation_wins_and_both_reports_are_kept(
        self, archive: Archive, head_ct: list[Path], tmp_path: Path
    ) -> None:
        make_bundle(archive.models_dir, name="ich-test", version="1.0.0", probability=0.95)
        datasets = fresh_copy(head_ct, tmp_path)
        study_uid = archive.store_datasets(datasets[:-2])
        archive.use_models()
        first_job = archive.ready(study_uid)
        # Instances arrive after triage started: the study becomes ready again.
        archive.store_datasets(datasets[-2:])
        second_job = archive.ready(study_uid)
        assert second_job.generation == first_job.generation + 1

        # The second analysis finishes first; the late first one must not win.
        asyncio.run(triage_study(second_job.id))
        asyncio.run(triage_study(first_job.id))

        state = archive.state(study_uid)
        assert state.generation == 2 and state.state == TriageStateValues.TRIAGED
        reports = archive.reports(study_uid)
        # Generation 1 was superseded before it started: it is not analysed at all.
        assert [int(r.InstanceNumber) for r in reports] == [2]
        assert state.sr_sop_instance_uid == reports[-1].SOPInstanceUID
        with archive.db.reader() as session:
            statuses = session.scalars(select(TriageJob.status).order_by(TriageJob.id)).all()
        assert statuses == ["done", "done"]

    def test_study_with_no_applicable_model_gets_that_state_and_says_so_in_sr(
        self, archive: Archive
    ) -> None:
        make_bundle(archive.models_dir, name="ich-test", version="1.0.0", rule=HEAD_RULE)
        study, series = generate_uid(), generate_uid()
        study_uid = archive.store_datasets(
            [
                ct_dataset(
                    study_instance_uid=study,
                    series_instance_uid=series,
                    instance_number=i + 1,
                    body_part_examined="ABDOMEN",
                    study_description="CT ABDOMEN",
                    series_description="PORTAL VENOUS",
                    seed=i,
                )
                for i in range(3)
            ]
        )

        archive.triage(study_uid)

        state = archive.state(study_uid)
        assert state.state == TriageStateValues.NO_APPLICABLE_MODEL
        assert state.failure_reason is None
        [sr] = archive.reports(study_uid)
        assert evaluations(sr)["AI analysis outcome"] == "No applicable AI model"
        assert archive.model_results() == []

    def test_no_applicable_model_without_sr_when_the_site_turns_it_off(
        self, archive: Archive
    ) -> None:
        archive.settings = archive.settings.model_copy(
            update={"triage_report_no_applicable_model": False}
        )
        study_uid = archive.store_datasets(
            [ct_dataset(study_instance_uid=generate_uid(), body_part_examined="ABDOMEN")]
        )

        archive.triage(study_uid)

        state = archive.state(study_uid)
        assert state.state == TriageStateValues.NO_APPLICABLE_MODEL
        assert state.sr_sop_instance_uid is None
        assert archive.reports(study_uid) == []

    def test_corrupt_pixel_data_fails_the_study_with_the_reason(
        self, archive: Archive, head_ct: list[Path], tmp_path: Path
    ) -> None:
        make_bundle(archive.models_dir, name="ich-test", version="1.0.0")
        datasets = fresh_copy(head_ct, tmp_path)
        broken = datasets[5]
        # JPEG Lossless framing around bytes that are no JPEG stream: accepted
        # by the archive (it never decodes on the way in), undecodable for analysis.
        broken.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        broken.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(range(256)) * 8])
        broken["PixelData"].VR = "OB"
        study_uid = archive.store_datasets(datasets)

        outcome = archive.triage(study_uid)

        state = archive.state(study_uid)
        assert state.state == TriageStateValues.FAILED
        assert "corrupt pixel data" in (state.failure_reason or "")
        assert str(broken.SeriesInstanceUID) in (state.failure_reason or "")
        assert outcome["state"] == "failed"
        [sr] = archive.reports(study_uid)
        assert sr.CompletionFlag == "PARTIAL"
        assert "corrupt pixel data" in evaluations(sr)["AI analysis failure reason"]

    def test_inconsistent_geometry_fails_the_study(
        self, archive: Archive, head_ct: list[Path], tmp_path: Path
    ) -> None:
        make_bundle(archive.models_dir, name="ich-test", version="1.0.0")
        datasets = fresh_copy(head_ct, tmp_path)
        datasets[3].ImagePositionPatient = list(datasets[2].ImagePositionPatient)
        study_uid = archive.store_datasets(datasets)

        archive.triage(study_uid)

        state = archive.state(study_uid)
        assert state.state == TriageStateValues.FAILED
        assert "inconsistent geometry" in (state.failure_reason or "")

    def test_model_that_raises_fails_the_study_and_others_go_on(
        self, archive: Archive, head_ct: list[Path], tmp_path: Path
    ) -> None:
        make_bundle(archive.models_dir, name="broken", version="0.1", kind="raises")
        failing = archive.store_datasets(fresh_copy(head_ct, tmp_path))
        archive.triage(failing)
        state = archive.state(failing)
        assert state.state == TriageStateValues.FAILED
        assert "model broken 0.1 failed" in (state.failure_reason or "")

        # The next study goes on normally once a working model is installed.
        for bundle in archive.models_dir.iterdir():
            shutil.rmtree(bundle)
        make_bundle(archive.models_dir, name="ich-test", version="1.0.0", probability=0.1)
        passing = archive.store_datasets(fresh_copy(head_ct, tmp_path))
        archive.triage(passing)
        assert archive.state(passing).state == TriageStateValues.TRIAGED
        assert archive.state(passing).priority_class == "ROUTINE"

    def test_shadow_model_is_recorded_but_sets_no_priority(
        self, archive: Archive, head_ct: list[Path], tmp_path: Path
    ) -> None:
        make_bundle(archive.models_dir, name="ich-test", version="1.0.0", probability=0.1)
        make_bundle(
            archive.models_dir, name="ich-next", version="2.0.0", probability=0.99, mode="shadow"
        )
        study_uid = archive.store_datasets(fresh_copy(head_ct, tmp_path))

        archive.triage(study_uid)

        state = archive.state(study_uid)
        assert state.state == TriageStateValues.TRIAGED
        assert state.priority_class == "ROUTINE"
        modes = {(r.model_name, r.mode) for r in archive.model_results()}
        assert modes == {("ich-test", "active"), ("ich-next", "shadow")}
        [sr] = archive.reports(study_uid)
        names = {
            item.TextValue
            for item in hd.sr.utils.find_content_items(
                hd.sr.Comprehensive3DSR.from_dataset(sr),
                name=pydicom.sr.codedict.codes.DCM.AlgorithmName,
                recursive=True,
            )
        }
        assert names == {"ich-test"}


def test_volume_loading_takes_pixel_values_in_hounsfield(head_ct: list[Path]) -> None:
    from archive.analysis import InstanceFile, SeriesPlan, load_volume
    from pipeline.selection import SeriesDescriptor

    series = SeriesPlan(
        SeriesDescriptor(series_instance_uid="1.2.3", modality="CT"),
        tuple(InstanceFile(str(i), "", p, "") for i, p in enumerate(head_ct)),
        "fingerprint",
    )
    volume = load_volume(series)
    assert volume.shape[0] == len(head_ct)
    assert float(np.min(volume.pixels)) <= -900  # air, after Rescale Intercept


class TestRetryCondition:
    def test_transient_errors_are_retried_data_errors_are_not(self) -> None:
        from prefect.states import Failed

        from archive.analysis import AnalysisError
        from flows.triage import retry_transient

        assert retry_transient(None, None, Failed(data=OSError("file store unavailable")))
        assert not retry_transient(None, None, Failed(data=AnalysisError("corrupt pixel data")))
