"""The shipped ptx_dx_demo model: committed numbers reproduce, radiographs are flagged right,
and it never applies to a CT."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from models.phantoms import write_chest_dx
from models.registry import SHIPPED_BUNDLES_DIR, InstalledModel, ModelRegistry
from pipeline.selection import SeriesDescriptor
from pipeline.volume import volume_from_datasets
from tests.bundle_support import assert_evaluation_reproduces, series_descriptor

BUNDLE = SHIPPED_BUNDLES_DIR / "ptx_dx_demo"
POSITIVE_SEED = 900_000
NEGATIVE_SEED = 900_005


@pytest.fixture(scope="module")
def shipped() -> ModelRegistry:
    return ModelRegistry.discover([SHIPPED_BUNDLES_DIR])


@pytest.fixture(scope="module")
def ptx(shipped: ModelRegistry) -> InstalledModel:
    return shipped.get("ptx_dx_demo")


class TestShippedBundle:
    def test_bundle_is_valid_and_documented(self, ptx: InstalledModel) -> None:
        (finding,) = ptx.findings
        assert (finding.concept.value, finding.concept.scheme_designator) == ("36118008", "SCT")
        assert finding.severity.value == "urgent"
        card = (BUNDLE / "docs" / "README.md").read_text().lower()
        assert "not for clinical use" in card
        assert "synthetic" in card

    def test_evaluation_reproduces_committed_numbers(self, ptx: InstalledModel) -> None:
        assert_evaluation_reproduces(BUNDLE, ptx, rate_tolerance=0.011)


class TestOnDicomPhantoms:
    def test_positive_radiograph_is_flagged(self, ptx: InstalledModel, tmp_path: Path) -> None:
        (path,) = write_chest_dx(tmp_path, positive=True, seed=POSITIVE_SEED, patient_id="PX")
        ds = pydicom.dcmread(path)
        assert ptx in ModelRegistry([ptx]).applicable(series_descriptor([ds]))
        (finding,) = ptx.predict(volume_from_datasets([ds])).findings
        assert finding.present
        assert finding.volume_ml is None  # a projection image has no volume
        assert finding.key_sop_instance_uid == ds.SOPInstanceUID
        assert finding.location is not None

    def test_negative_radiograph_is_not_flagged(self, ptx: InstalledModel, tmp_path: Path) -> None:
        (path,) = write_chest_dx(tmp_path, positive=False, seed=NEGATIVE_SEED, patient_id="PX")
        (finding,) = ptx.predict(volume_from_datasets([pydicom.dcmread(path)])).findings
        assert not finding.present
        assert finding.location is None

    def test_dx_phantom_passes_dciodvfy(self, tmp_path: Path) -> None:
        if shutil.which("dciodvfy") is None:
            pytest.fail("dciodvfy missing; run scripts/setup.sh")
        (path,) = write_chest_dx(tmp_path, positive=True, seed=1, patient_id="PX")
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        assert [line for line in report.stderr.splitlines() if line.startswith("Error")] == []

    def test_ct_series_never_matches(self, ptx: InstalledModel) -> None:
        chest_ct = SeriesDescriptor("1.2", modality="CT", body_part_examined="CHEST")
        assert not ptx.rule.matches(chest_ct)

    def test_multi_image_series_is_refused_with_reason(self, ptx: InstalledModel) -> None:
        import numpy as np

        from models.registry import ModelError
        from pipeline.volume import Volume

        volume = Volume(
            pixels=np.zeros((2, 64, 64), dtype=np.float32),
            spacing=(1.0, 1.0, 1.0),
            origin=(0.0, 0.0, 0.0),
            orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
            sop_instance_uids=("1.1", "1.2"),
            modality="DX",
            series_instance_uid="1",
        )
        with pytest.raises(ModelError, match=r"a 2D model needs a single-image series, got 2"):
            ptx.predict(volume)
