"""The shipped ich_ct_demo model: committed numbers reproduce, phantoms are flagged right,
and the real abdominal CT gets no applicable model."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from models.phantoms import head_phantom, write_head_ct
from models.registry import SHIPPED_BUNDLES_DIR, InstalledModel, ModelRegistry
from pipeline.volume import volume_from_datasets
from tests.bundle_support import assert_evaluation_reproduces, series_descriptor
from tests.peers import CT_SERIES_DIR

BUNDLE = SHIPPED_BUNDLES_DIR / "ich_ct_demo"

POSITIVE_SEED = 900_000
"""A demo phantom with a hemorrhage (seeds outside the training, validation and test ranges)."""
NEGATIVE_SEED = 900_001


@pytest.fixture(scope="module")
def shipped() -> ModelRegistry:
    return ModelRegistry.discover([SHIPPED_BUNDLES_DIR])


@pytest.fixture(scope="module")
def ich(shipped: ModelRegistry) -> InstalledModel:
    return shipped.get("ich_ct_demo")


class TestShippedBundle:
    def test_bundle_is_valid_and_documented(
        self, shipped: ModelRegistry, ich: InstalledModel
    ) -> None:
        assert not shipped.problems
        assert ich.mode.value == "active"
        (finding,) = ich.findings
        assert (finding.concept.value, finding.concept.scheme_designator) == ("1386000", "SCT")
        assert finding.severity.value == "critical"
        card = (BUNDLE / "docs" / "README.md").read_text()
        assert "not for clinical use" in card.lower()
        assert "synthetic" in card.lower()
        assert (BUNDLE / "models" / "model.pt").stat().st_size < 5_000_000

    def test_evaluation_reproduces_committed_numbers(self, ich: InstalledModel) -> None:
        assert_evaluation_reproduces(BUNDLE, ich, rate_tolerance=0.021)


class TestOnDicomPhantoms:
    def test_positive_phantom_is_flagged_with_a_mask(
        self, ich: InstalledModel, tmp_path: Path
    ) -> None:
        paths = write_head_ct(tmp_path, positive=True, seed=POSITIVE_SEED, patient_id="PH-POS")
        datasets = [pydicom.dcmread(p) for p in paths]
        assert ich in ModelRegistry([ich]).applicable(series_descriptor(datasets))
        result = ich.predict(volume_from_datasets(datasets))
        (finding,) = result.findings
        assert finding.probability >= finding.definition.threshold
        assert finding.present
        truth = head_phantom(POSITIVE_SEED, positive=True).lesion_ml
        assert finding.volume_ml == pytest.approx(truth, rel=0.6)
        assert finding.key_sop_instance_uid in {ds.SOPInstanceUID for ds in datasets}
        assert finding.location is not None

    def test_negative_phantom_is_not_flagged(self, ich: InstalledModel, tmp_path: Path) -> None:
        paths = write_head_ct(tmp_path, positive=False, seed=NEGATIVE_SEED, patient_id="PH-NEG")
        result = ich.predict(volume_from_datasets([pydicom.dcmread(p) for p in paths]))
        (finding,) = result.findings
        assert finding.probability < finding.definition.threshold
        assert not finding.present


class TestRealAbdominalCT:
    def test_abdominal_ct_has_no_applicable_model(self, shipped: ModelRegistry) -> None:
        files = sorted(CT_SERIES_DIR.glob("*.dcm"))
        if not files:
            pytest.skip(f"real DICOM data not available at {CT_SERIES_DIR}")
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        assert shipped.applicable(series_descriptor(headers)) == []
