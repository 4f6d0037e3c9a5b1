"""Drop-in proof: a Model Zoo style bundle made with monai.bundle tooling runs once dropped in.

The bundle is not one of ours: a MONAI UNet declared in a Model Zoo style
inference.json (LoadImaged, EnsureChannelFirstd, Orientationd-free intensity
transforms, a SlidingWindowInferer whose patch is smaller than the input),
its weights exported to TorchScript by ``monai.bundle.ckpt_export``. Adding
only configs/triage.json and copying the folder into the site's models
directory makes the registry pick it up for matching series and run it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from archive.config import Settings
from models.phantoms import head_phantom
from models.registry import ModelModeValues, ModelRegistry, default_model_directories
from pipeline.selection import SeriesDescriptor
from pipeline.volume import Volume

ZOO_INFERENCE = {
    "imports": ["$import torch"],
    "bundle_root": ".",
    "image_key": "image",
    "network_def": {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [4, 8, 16],
        "strides": [2, 2],
        "num_res_units": 1,
    },
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "@image_key",
                "a_min": -100,
                "a_max": 200,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            },
            {"_target_": "Resized", "keys": "@image_key", "spatial_size": [32, 48, 48]},
        ],
    },
    "inferer": {
        "_target_": "SlidingWindowInferer",
        "roi_size": [32, 32, 32],
        "sw_batch_size": 2,
        "overlap": 0.25,
    },
}

ZOO_METADATA = {
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
    "0.8.1/meta_schema_20220324.json",
    "version": "0.4.2",
    "changelog": {"0.4.2": "a bundle from elsewhere"},
    "monai_version": "1.6.1",
    "pytorch_version": "2.13.0",
    "numpy_version": "2",
    "name": "zoo_brain_lesion",
    "task": "lesion segmentation",
    "description": "A Model Zoo style bundle, not made by pacs-triage",
    "authors": "someone else",
    "copyright": "someone else",
    "network_data_format": {
        "inputs": {
            "image": {
                "type": "image",
                "format": "hounsfield",
                "modality": "CT",
                "num_channels": 1,
                "spatial_shape": [32, 32, 32],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {"0": "image"},
            }
        },
        "outputs": {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "num_channels": 2,
                "spatial_shape": [32, 32, 32],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {"0": "background", "1": "lesion"},
            }
        },
    },
}

TRIAGE = {
    "mode": "shadow",
    "rule": {"modality": ["CT"], "body_part": ["HEAD"], "min_instances": 16},
    "findings": [
        {
            "key": "lesion",
            "concept": {"value": "1386000", "scheme_designator": "SCT", "meaning": "ICH"},
            "severity": "urgent",
            "threshold": 0.5,
            "output": 0,
            "index": 1,
            "activation": "softmax",
            "mask": {"output": 0, "index": 1, "activation": "softmax", "threshold": 0.5},
        }
    ],
}


@pytest.fixture
def zoo_bundle(tmp_path: Path) -> Path:
    """Build a Model Zoo style bundle with monai.bundle.ckpt_export (TorchScript)."""
    from monai.bundle import ConfigParser, ckpt_export

    bundle = tmp_path / "download" / "zoo_brain_lesion"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "docs").mkdir()
    (bundle / "configs" / "inference.json").write_text(json.dumps(ZOO_INFERENCE))
    (bundle / "configs" / "metadata.json").write_text(json.dumps(ZOO_METADATA))
    (bundle / "docs" / "README.md").write_text("# zoo_brain_lesion\n")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    ckpt_export(
        net_id="network_def",
        filepath=str(bundle / "models" / "model.ts"),
        ckpt_file=str(bundle / "models" / "model.pt"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        input_shape=[1, 1, 32, 32, 32],
    )
    return bundle


def test_zoo_bundle_dropped_in_runs_on_matching_series(zoo_bundle: Path, tmp_path: Path) -> None:
    site = tmp_path / "site-models"
    settings = Settings(data_dir=tmp_path / "data", models_dirs=[site])
    before = ModelRegistry.discover(default_model_directories(settings))
    assert "zoo_brain_lesion" not in {m.name for m in before.models()}

    # The site adds the triage sidecar and drops the folder in.
    (zoo_bundle / "configs" / "triage.json").write_text(json.dumps(TRIAGE))
    site.mkdir()
    shutil.copytree(zoo_bundle, site / zoo_bundle.name)

    registry = ModelRegistry.discover(default_model_directories(settings))
    assert not [p for p in registry.problems if "zoo_brain_lesion" in str(p.path)]
    model = registry.get("zoo_brain_lesion", "0.4.2")
    assert model.mode is ModelModeValues.SHADOW
    assert model.weights_file == site / "zoo_brain_lesion" / "models" / "model.ts"

    head = SeriesDescriptor(
        "1.2.3", modality="CT", body_part_examined="HEAD", number_of_instances=40
    )
    abdomen = SeriesDescriptor("1.2.4", modality="CT", body_part_examined="CHEST")
    assert model in registry.applicable(head)
    assert model not in registry.applicable(abdomen)

    phantom = head_phantom(4, positive=True, slices=40, rows=96)
    volume = Volume(
        pixels=phantom.hu.astype(np.float32),
        spacing=phantom.spacing,
        origin=(0.0, 0.0, 0.0),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        sop_instance_uids=tuple(f"1.2.3.{k}" for k in range(40)),
        modality="CT",
        series_instance_uid="1.2.3",
    )
    result = model.predict(volume)
    assert result.model.name == "zoo_brain_lesion"
    assert result.model.version == "0.4.2"
    (finding,) = result.findings
    assert finding.definition.key == "lesion"
    assert 0.0 <= finding.probability <= 1.0
    assert finding.volume_ml is not None  # the mask output was read back onto the volume
