"""``pacs-triage cohort create|list|status|export`` as a user runs them (child processes)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

from models.testing import make_bundle
from tests.flows.cohort_support import Archive, cli


def run(archive: Archive, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli("cohort", *args), env=archive.env(), capture_output=True, text=True, timeout=180
    )


class TestCohortCli:
    def test_create_from_csv_status_and_deidentified_export(self, tmp_path: Path) -> None:
        make_bundle(tmp_path / "models", name="ich", version="1.0", kind="constant")
        archive = Archive.create(tmp_path / "data", models_dirs=[tmp_path / "models"])
        for seed in range(3):
            archive.add_phantom(tmp_path / "w", seed, accession_number=f"ACC{seed}")
        bad = tmp_path / "bad.csv"
        bad.write_text("AccessionNumber\nACC0\nACC9\n")
        refused = run(archive, "create", "c", "--model", "ich", "--csv", str(bad))
        assert refused.returncode == 2
        assert "1 bad row(s) in the CSV:\n  line 3: no study with AccessionNumber 'ACC9'" in (
            refused.stderr
        )
        good = tmp_path / "good.csv"
        good.write_text("AccessionNumber\nACC2\nACC0\n")
        created = run(archive, "create", "c", "--model", "ich:1.0", "--csv", str(good), "--no-sr")
        assert created.returncode == 0, created.stderr
        assert "cohort c: 2 studies, model ich 1.0" in created.stdout
        unknown = run(archive, "create", "d", "--model", "nope", "--modality", "CT")
        assert unknown.returncode == 2 and "no installed model nope" in unknown.stderr

        status = json.loads(run(archive, "status", "c", "--json").stdout)
        assert status["counts"]["pending"] == 2 and status["write_sr"] is False
        assert status["selection"]["kind"] == "csv"
        assert "c " in run(archive, "list").stdout

        out = tmp_path / "results.csv"
        exported = run(archive, "export", "c", "-o", str(out), "--deidentify", "--key", "k" * 12)
        assert exported.returncode == 0, exported.stderr
        with out.open() as handle:
            rows = list(csv.DictReader(handle))
        assert [r["status"] for r in rows] == ["pending", "pending"]
        assert not {r["AccessionNumber"] for r in rows} & {"ACC0", "ACC2"}
        no_key = run(archive, "export", "c", "-o", str(out), "--deidentify")
        assert no_key.returncode == 2 and "needs --key" in no_key.stderr
        archive.db.dispose()
