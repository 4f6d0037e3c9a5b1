"""Synthetic head CT phantoms: valid CT Image Storage, Hounsfield units, deterministic, fast."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.phantoms import head_phantom, write_head_ct
from pipeline.selection import SeriesDescriptor, SeriesRule
from pipeline.volume import volume_from_datasets


class TestWriteHeadCT:
    def test_series_reads_back_as_a_head_ct_volume(self, tmp_path: Path) -> None:
        started = time.perf_counter()
        paths = write_head_ct(tmp_path, positive=True, seed=7, patient_id="PH-7", slices=32)
        assert time.perf_counter() - started < 5.0  # typically 0.2 s
        datasets = [pydicom.dcmread(p) for p in paths]
        volume = volume_from_datasets(datasets)
        assert volume.shape == (32, 256, 256)
        assert volume.modality == "CT"
        first = datasets[0]
        assert first.SOPClassUID == pydicom.uid.CTImageStorage
        assert first.BodyPartExamined == "HEAD"
        assert first.StudyDescription == "CT HEAD"
        assert first.PatientID == "PH-7"
        assert len({ds.SOPInstanceUID for ds in datasets}) == 32
        assert volume.pixels.min() <= -1000  # air
        assert volume.pixels.max() >= 600  # bone

    def test_same_seed_same_study(self, tmp_path: Path) -> None:
        a = write_head_ct(tmp_path / "a", positive=False, seed=3, patient_id="P", slices=8)
        b = write_head_ct(tmp_path / "b", positive=False, seed=3, patient_id="P", slices=8)
        assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]

    def test_given_study_uid_is_used(self, tmp_path: Path) -> None:
        paths = write_head_ct(
            tmp_path, positive=False, seed=1, patient_id="P", study_instance_uid="1.2.3.4", slices=4
        )
        assert pydicom.dcmread(paths[0]).StudyInstanceUID == "1.2.3.4"

    def test_dciodvfy_finds_no_errors(self, tmp_path: Path) -> None:
        if shutil.which("dciodvfy") is None:
            pytest.fail("dciodvfy missing; run scripts/setup.sh")
        paths = write_head_ct(tmp_path, positive=True, seed=2, patient_id="P", slices=4)
        report = subprocess.run(["dciodvfy", str(paths[1])], capture_output=True, text=True)
        errors = [line for line in report.stderr.splitlines() if line.startswith("Error")]
        assert errors == []

    def test_head_rule_matches(self, tmp_path: Path) -> None:
        ds = pydicom.dcmread(write_head_ct(tmp_path, positive=False, seed=1, patient_id="P")[0])
        series = SeriesDescriptor(
            ds.SeriesInstanceUID,
            modality=ds.Modality,
            body_part_examined=ds.BodyPartExamined,
            series_description=ds.SeriesDescription,
            number_of_instances=40,
        )
        assert SeriesRule(modality=("CT",), body_part=("HEAD",)).matches(series)


class TestHeadPhantom:
    def test_positive_has_hyperdense_lesion_negative_none(self) -> None:
        for seed in range(6):
            positive = head_phantom(seed, positive=True, slices=24, rows=96)
            negative = head_phantom(seed, positive=False, slices=24, rows=96)
            assert positive.lesion.any()
            assert not negative.lesion.any()
            assert 40 <= float(np.median(positive.hu[positive.lesion])) <= 100
            assert positive.lesion_ml > 0.1
