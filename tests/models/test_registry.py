"""Registry: discovery, validation failures with their messages, shadow vs active, version/hash."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from archive.config import Settings
from models.registry import (
    SHIPPED_BUNDLES_DIR,
    BundleValidationError,
    ModelError,
    ModelModeValues,
    ModelNotFoundError,
    ModelRegistry,
    default_model_directories,
    validate_bundle,
)
from models.testing import make_bundle
from pipeline.findings import SeverityValues
from pipeline.selection import SeriesDescriptor, SeriesRule
from pipeline.volume import Volume

HEAD_RULE = {"modality": ["CT"], "body_part": ["HEAD"], "body_part_keywords": ["HEAD"]}


def _volume(shape: tuple[int, int, int] = (16, 32, 32)) -> Volume:
    pixels = np.full(shape, -1000.0, dtype=np.float32)
    pixels[4:8, 8:16, 8:16] = 80.0  # 4 x 8 x 8 voxels of "blood"
    return Volume(
        pixels=pixels,
        spacing=(5.0, 1.0, 1.0),
        origin=(0.0, 0.0, 0.0),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        sop_instance_uids=tuple(f"1.2.3.{k}" for k in range(shape[0])),
        modality="CT",
        series_instance_uid="1.2.3",
    )


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


class TestValidateBundle:
    def test_valid_bundle_gives_identity_with_weights_hash(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1.0.0", probability=0.8)
        model = validate_bundle(bundle)
        digest = hashlib.sha256((bundle / "models" / "model.ts").read_bytes()).hexdigest()
        assert model.identity.name == "ich"
        assert model.identity.version == "1.0.0"
        assert model.identity.weights_sha256 == digest
        assert model.mode is ModelModeValues.ACTIVE
        assert model.path == bundle
        assert [f.key for f in model.findings] == ["hemorrhage"]
        assert model.findings[0].severity is SeverityValues.CRITICAL
        assert model.findings[0].concept.value == "1386000"

    def test_state_dict_bundle_loads_network_def(self, tmp_path: Path) -> None:
        bundle = make_bundle(
            tmp_path, name="ich", version="1", probability=0.3, weights_format="pt"
        )
        result = validate_bundle(bundle).predict(_volume())
        assert result.findings[0].probability == pytest.approx(0.3, abs=1e-5)

    def test_missing_metadata_raises(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        (bundle / "configs" / "metadata.json").unlink()
        with pytest.raises(BundleValidationError, match=r"missing configs/metadata\.json"):
            validate_bundle(bundle)

    def test_missing_inference_config_raises(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        (bundle / "configs" / "inference.json").unlink()
        with pytest.raises(BundleValidationError, match=r"missing configs/inference\.json"):
            validate_bundle(bundle)

    def test_missing_weights_raises(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        (bundle / "models" / "model.ts").unlink()
        with pytest.raises(
            BundleValidationError, match=r"missing models/model\.ts or models/model\.pt"
        ):
            validate_bundle(bundle)

    def test_missing_model_card_raises(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        (bundle / "docs" / "README.md").unlink()
        with pytest.raises(
            BundleValidationError, match=r"missing docs/README\.md \(the model card\)"
        ):
            validate_bundle(bundle)

    def test_metadata_without_version_raises(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        _edit_json(bundle / "configs" / "metadata.json", version=None)
        with pytest.raises(BundleValidationError, match=r"metadata\.json lacks a 'version'"):
            validate_bundle(bundle)

    def test_invalid_json_raises(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        (bundle / "configs" / "triage.json").write_text("{not json")
        with pytest.raises(BundleValidationError, match=r"triage\.json is not valid JSON"):
            validate_bundle(bundle)

    def test_missing_triage_section_raises(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        (bundle / "configs" / "triage.json").unlink()
        with pytest.raises(BundleValidationError, match=r"missing configs/triage\.json"):
            validate_bundle(bundle)

    def test_missing_rule_raises(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        _edit_json(bundle / "configs" / "triage.json", rule=None)
        with pytest.raises(BundleValidationError, match=r"has no selection 'rule'"):
            validate_bundle(bundle)

    def test_rule_with_unknown_key_raises(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        _edit_json(bundle / "configs" / "triage.json", rule={"modality": ["CT"], "organ": "x"})
        with pytest.raises(BundleValidationError, match=r"rule has unknown keys \['organ'\]"):
            validate_bundle(bundle)

    def test_rule_with_bad_regex_raises(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        _edit_json(
            bundle / "configs" / "triage.json",
            rule={"modality": ["CT"], "series_description": "(unclosed"},
        )
        with pytest.raises(BundleValidationError, match=r"not a valid regular expression"):
            validate_bundle(bundle)

    def test_bad_mode_raises(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        _edit_json(bundle / "configs" / "triage.json", mode="live")
        with pytest.raises(BundleValidationError, match=r"mode must be 'active' or 'shadow'"):
            validate_bundle(bundle)

    def test_no_findings_raises(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        _edit_json(bundle / "configs" / "triage.json", findings=[])
        with pytest.raises(BundleValidationError, match=r"must declare at least one finding"):
            validate_bundle(bundle)

    def test_finding_without_concept_code_raises(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        triage = json.loads((bundle / "configs" / "triage.json").read_text())
        del triage["findings"][0]["concept"]["scheme_designator"]
        (bundle / "configs" / "triage.json").write_text(json.dumps(triage))
        with pytest.raises(BundleValidationError, match=r"findings\[0\]\.concept lacks scheme"):
            validate_bundle(bundle)

    def test_bad_severity_raises(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1", severity="deadly")
        with pytest.raises(BundleValidationError, match=r"findings\[0\]\.severity must be one of"):
            validate_bundle(bundle)

    def test_output_index_beyond_network_output_raises(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        triage = json.loads((bundle / "configs" / "triage.json").read_text())
        triage["findings"][0]["index"] = 3
        (bundle / "configs" / "triage.json").write_text(json.dumps(triage))
        with pytest.raises(
            BundleValidationError,
            match=r"wrong output shape for finding 'hemorrhage'.*shape \(1, 1\); declared index 3",
        ):
            validate_bundle(bundle)

    def test_missing_mask_output_raises(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        triage = json.loads((bundle / "configs" / "triage.json").read_text())
        triage["findings"][0]["mask"] = {"output": 1}
        (bundle / "configs" / "triage.json").write_text(json.dumps(triage))
        with pytest.raises(
            BundleValidationError, match=r"mask of finding 'hemorrhage'.*one tensor"
        ):
            validate_bundle(bundle)

    def test_output_channels_differing_from_metadata_raise(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
        metadata["network_data_format"]["outputs"]["pred"]["num_channels"] = 2
        (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
        with pytest.raises(BundleValidationError, match=r"gives 1 channels.*num_channels says 2"):
            validate_bundle(bundle)

    def test_broken_weights_raise(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path, name="ich", version="1")
        (bundle / "models" / "model.ts").write_bytes(b"not a torchscript archive")
        with pytest.raises(BundleValidationError, match=r"the network does not load"):
            validate_bundle(bundle)


class TestPredict:
    def test_constant_model_returns_its_probability(self, tmp_path: Path) -> None:
        model = validate_bundle(make_bundle(tmp_path, name="c", version="1", probability=0.8))
        result = model.predict(_volume())
        assert result.model == model.identity
        assert result.series_instance_uid == "1.2.3"
        assert result.findings[0].probability == pytest.approx(0.8, abs=1e-5)
        assert result.findings[0].present

    def test_mask_gives_volume_location_and_key_image(self, tmp_path: Path) -> None:
        model = validate_bundle(make_bundle(tmp_path, name="m", version="1", with_mask=True))
        finding = model.predict(_volume()).findings[0]
        # 4 x 8 x 8 voxels of 5 x 1 x 1 mm above the window's midpoint: 1.28 ml.
        assert finding.volume_ml == pytest.approx(1.28, rel=0.05)
        assert finding.location is not None
        assert finding.location[2] == pytest.approx(5.0 * 5.5, abs=5.0)
        assert finding.key_sop_instance_uid in {f"1.2.3.{k}" for k in range(4, 8)}

    def test_failing_model_raises_model_error(self, tmp_path: Path) -> None:
        model = validate_bundle(make_bundle(tmp_path, name="bad", version="1", kind="raises"))
        with pytest.raises(ModelError, match=r"model bad 1: inference failed.*synthetic failure"):
            model.predict(_volume())

    def test_batch_equals_single(self, tmp_path: Path) -> None:
        model = validate_bundle(make_bundle(tmp_path, name="i", version="1", kind="intensity"))
        volumes = [_volume(), _volume((10, 20, 20))]
        batch = model.predict_batch(volumes)
        singles = [model.predict(v) for v in volumes]
        for a, b in zip(batch, singles, strict=True):
            assert a.findings[0].probability == pytest.approx(b.findings[0].probability, abs=1e-6)


class TestModelRegistry:
    def test_discover_skips_invalid_bundles_and_keeps_problems(self, tmp_path: Path) -> None:
        make_bundle(tmp_path, name="good", version="1")
        broken = make_bundle(tmp_path, name="broken", version="1")
        (broken / "configs" / "triage.json").unlink()
        (tmp_path / "not-a-bundle").mkdir()
        registry = ModelRegistry.discover([tmp_path, tmp_path / "absent"])
        assert [m.name for m in registry.models()] == ["good"]
        assert len(registry.problems) == 1
        assert registry.problems[0].path == broken
        assert "missing configs/triage.json" in registry.problems[0].message

    def test_active_and_shadow_versions_side_by_side(self, tmp_path: Path) -> None:
        make_bundle(tmp_path, name="ich", version="1.0", mode="active", rule=HEAD_RULE)
        make_bundle(
            tmp_path, name="ich", version="2.0", mode="shadow", rule=HEAD_RULE, probability=0.7
        )
        registry = ModelRegistry.discover([tmp_path])
        head = SeriesDescriptor("1.2", modality="CT", body_part_examined="HEAD")
        applicable = registry.applicable(head)
        assert {(m.version, m.mode) for m in applicable} == {
            ("1.0", ModelModeValues.ACTIVE),
            ("2.0", ModelModeValues.SHADOW),
        }
        assert registry.get("ich").version == "1.0"
        assert registry.get("ich", "2.0").mode is ModelModeValues.SHADOW
        assert (
            registry.get("ich", "1.0").identity.weights_sha256
            != registry.get("ich", "2.0").identity.weights_sha256
        )

    def test_second_active_version_is_refused(self, tmp_path: Path) -> None:
        make_bundle(tmp_path, name="ich", version="1.0")
        make_bundle(tmp_path, name="ich", version="2.0")
        registry = ModelRegistry.discover([tmp_path])
        assert [m.version for m in registry.models()] == ["1.0"]
        assert "already has an active version (1.0" in registry.problems[0].message

    def test_same_version_in_two_directories_is_refused(self, tmp_path: Path) -> None:
        make_bundle(tmp_path / "a", name="ich", version="1.0")
        make_bundle(tmp_path / "b", name="ich", version="1.0")
        registry = ModelRegistry.discover([tmp_path / "a", tmp_path / "b"])
        assert len(registry.models()) == 1
        assert "ich 1.0 is already installed" in registry.problems[0].message

    def test_applicable_follows_the_rule(self, tmp_path: Path) -> None:
        make_bundle(tmp_path, name="head", version="1", rule=SeriesRule(**HEAD_RULE))
        make_bundle(
            tmp_path, name="chest", version="1", rule={"modality": ["CR", "DX"]}, finding_key="ptx"
        )
        registry = ModelRegistry.discover([tmp_path])
        abdomen = SeriesDescriptor("1.2", modality="CT", body_part_examined="ABDOMEN")
        chest = SeriesDescriptor("1.3", modality="DX")
        assert registry.applicable(abdomen) == []
        assert [m.name for m in registry.applicable(chest)] == ["chest"]

    def test_get_unknown_model_names_installed_ones(self, tmp_path: Path) -> None:
        make_bundle(tmp_path, name="ich", version="1.0")
        registry = ModelRegistry.discover([tmp_path])
        with pytest.raises(
            ModelNotFoundError, match=r"no installed model ptx \(installed: ich 1\.0\)"
        ):
            registry.get("ptx")
        with pytest.raises(ModelNotFoundError, match=r"no installed model ich 9"):
            registry.get("ich", "9")

    def test_get_without_active_version_asks_for_one(self, tmp_path: Path) -> None:
        make_bundle(tmp_path, name="ich", version="1.0", mode="shadow")
        make_bundle(tmp_path, name="ich", version="2.0", mode="shadow")
        registry = ModelRegistry.discover([tmp_path])
        with pytest.raises(ModelNotFoundError, match=r"model ich has no active version"):
            registry.get("ich")

    def test_copied_bundle_keeps_its_hash(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path / "a", name="ich", version="1.0")
        copy = tmp_path / "b" / "ich"
        shutil.copytree(bundle, copy)
        assert validate_bundle(copy).identity == validate_bundle(bundle).identity


class TestDefaultModelDirectories:
    def test_shipped_then_configured_then_data_dir(self, tmp_path: Path) -> None:
        settings = Settings(data_dir=tmp_path / "data", models_dirs=[tmp_path / "site"])
        assert default_model_directories(settings) == [
            SHIPPED_BUNDLES_DIR,
            tmp_path / "site",
            tmp_path / "data" / "models",
        ]


class TestConfigureInference:
    def test_threads_and_device_from_settings(self, tmp_path: Path) -> None:
        import torch

        from models.registry import configure_inference

        before = torch.get_num_threads()
        try:
            settings = Settings(data_dir=tmp_path, model_threads=1, model_device="cpu")
            assert configure_inference(settings) == "cpu"
            assert torch.get_num_threads() == 1
        finally:
            torch.set_num_threads(before)
