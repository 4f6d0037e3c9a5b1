"""The shipped ich_ct_demo model: committed numbers reproduce, phantoms are flagged right,
and the real abdominal CT gets no applicable model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from models.phantoms import head_phantom, write_head_ct
from models.registry import SHIPPED_BUNDLES_DIR, InstalledModel, ModelRegistry
from pipeline.selection import SeriesDescriptor
from pipeline.volume import volume_from_datasets
from tests.peers import CT_SERIES_DIR

BUNDLE = SHIPPED_BUNDLES_DIR / "ich_ct_demo"
REPO = Path(__file__).resolve().parents[2]

POSITIVE_SEED = 900_000
"""A demo phantom with a hemorrhage (seeds outside the training, validation and test ranges)."""
NEGATIVE_SEED = 900_001


@pytest.fixture(scope="module")
def shipped() -> ModelRegistry:
    return ModelRegistry.discover([SHIPPED_BUNDLES_DIR])


@pytest.fixture(scope="module")
def ich(shipped: ModelRegistry) -> InstalledModel:
    return shipped.get("ich_ct_demo")


def _descriptor(datasets: list[pydicom.Dataset]) -> SeriesDescriptor:
    ds = datasets[0]
    return SeriesDescriptor(
        series_instance_uid=ds.SeriesInstanceUID,
        modality=ds.Modality,
        body_part_examined=ds.get("BodyPartExamined", ""),
        series_description=ds.get("SeriesDescription", ""),
        image_type=tuple(ds.get("ImageType", ())),
        number_of_instances=len(datasets),
        study_description=ds.get("StudyDescription", ""),
    )


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
        committed = json.loads((BUNDLE / "docs" / "evaluation.json").read_text())
        assert committed["weights_sha256"] == ich.identity.weights_sha256
        done = subprocess.run(
            [
                sys.executable,
                str(BUNDLE / "scripts" / "evaluate.py"),
                "--n",
                str(committed["n_test"]),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
        measured = json.loads(done.stdout)
        assert measured["weights_sha256"] == committed["weights_sha256"]
        assert measured["threshold"] == committed["threshold"]
        assert measured["auc"] == pytest.approx(committed["auc"], abs=0.01)
        assert measured["sensitivity"] == pytest.approx(committed["sensitivity"], abs=0.021)
        assert measured["specificity"] == pytest.approx(committed["specificity"], abs=0.021)


class TestOnDicomPhantoms:
    def test_positive_phantom_is_flagged_with_a_mask(
        self, ich: InstalledModel, tmp_path: Path
    ) -> None:
        paths = write_head_ct(tmp_path, positive=True, seed=POSITIVE_SEED, patient_id="PH-POS")
        datasets = [pydicom.dcmread(p) for p in paths]
        assert ich in ModelRegistry([ich]).applicable(_descriptor(datasets))
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
        assert shipped.applicable(_descriptor(headers)) == []
