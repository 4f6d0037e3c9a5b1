"""``pacs-triage models list|show|validate``, run as the real command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.testing import make_bundle

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], tmp_path: Path, *models_dirs: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PACS_TRIAGE_DATA_DIR": str(tmp_path / "data"),
        "PACS_TRIAGE_MODELS_DIRS": json.dumps([str(d) for d in models_dirs]),
        "PACS_TRIAGE_MODEL_DEVICE": "cpu",
        "PACS_TRIAGE_CONFIG": str(tmp_path / "absent.toml"),
    }
    return subprocess.run(
        [sys.executable, "-m", "archive.cli", "models", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site models directory with an active and a shadow version, and a broken bundle."""
    directory = tmp_path_factory.mktemp("site-models")
    make_bundle(directory, name="pneumo", version="1.0", rule={"modality": ["DX"]})
    make_bundle(
        directory,
        name="pneumo",
        version="2.0",
        mode="shadow",
        rule={"modality": ["DX"]},
        probability=0.4,
    )
    broken = make_bundle(directory, name="broken", version="1")
    (broken / "configs" / "inference.json").unlink()
    return directory


class TestModelsCommand:
    def test_list_shows_shipped_and_site_models_and_skipped_bundles(
        self, site: Path, tmp_path: Path
    ) -> None:
        done = _run(["list"], tmp_path, site)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].split()[:3] == ["NAME", "VERSION", "MODE"]
        assert any(line.split()[:3] == ["ich_ct_demo", "0.1.0", "active"] for line in lines)
        assert any(line.split()[:3] == ["pneumo", "1.0", "active"] for line in lines)
        assert any(line.split()[:3] == ["pneumo", "2.0", "shadow"] for line in lines)
        assert any(
            line.startswith("skipped:") and "missing configs/inference.json" in line
            for line in lines
        )

    def test_list_json(self, site: Path, tmp_path: Path) -> None:
        done = _run(["list", "--json"], tmp_path, site)
        listing = json.loads(done.stdout)
        names = {(m["name"], m["version"], m["mode"]) for m in listing["models"]}
        assert ("pneumo", "2.0", "shadow") in names
        assert len(listing["problems"]) == 1
        assert all(len(m["weights_sha256"]) == 64 for m in listing["models"])

    def test_show_active_version_by_default(self, site: Path, tmp_path: Path) -> None:
        done = _run(["show", "pneumo", "--json"], tmp_path, site)
        assert done.returncode == 0, done.stderr
        shown = json.loads(done.stdout)
        assert (shown["version"], shown["mode"]) == ("1.0", "active")
        assert shown["findings"][0]["concept"]["value"] == "1386000"

    def test_show_shipped_model_with_evaluation(self, tmp_path: Path) -> None:
        done = _run(["show", "ich_ct_demo"], tmp_path)
        assert done.returncode == 0, done.stderr
        assert "finding hemorrhage: (1386000, SCT" in done.stdout
        assert "severity critical" in done.stdout
        assert "evaluation: auc" in done.stdout

    def test_show_unknown_model_fails(self, tmp_path: Path) -> None:
        done = _run(["show", "nothing"], tmp_path)
        assert done.returncode == 1
        assert "no installed model nothing" in done.stderr

    def test_validate_good_bundle(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path / "new", name="candidate", version="3")
        done = _run(["validate", str(bundle)], tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("valid bundle: candidate 3 (active)")

    def test_validate_wrong_output_shape_fails_with_reason(self, tmp_path: Path) -> None:
        bundle = make_bundle(tmp_path / "new", name="candidate", version="3")
        triage = json.loads((bundle / "configs" / "triage.json").read_text())
        triage["findings"][0]["index"] = 2
        (bundle / "configs" / "triage.json").write_text(json.dumps(triage))
        done = _run(["validate", str(bundle)], tmp_path)
        assert done.returncode == 1
        assert "invalid bundle:" in done.stderr
        assert "wrong output shape for finding 'hemorrhage'" in done.stderr
