"""notebooks/cohort_analysis.ipynb runs on a small results file (executed with nbclient)."""

from __future__ import annotations

import csv
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from archive.cohort_export import COLUMN_NAMES, write_results
from tests.peers import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "cohort_analysis.ipynb"


def results(n: int = 20) -> tuple[list[dict], dict[str, int]]:
    rows, labels = [], {}
    for k in range(n):
        uid = f"1.2.826.0.1.3680043.8.498.{1000 + k}"
        positive = k % 2
        probability = 0.55 + 0.4 * (k / n) if positive else 0.45 * (k / n)
        labels[uid] = positive
        row = dict.fromkeys(COLUMN_NAMES)
        row.update(
            cohort="demo",
            StudyInstanceUID=uid,
            model_name="ich",
            model_version="1.0",
            finding="hemorrhage",
            probability=probability,
            present=probability >= 0.5,
            status="done",
        )
        rows.append(row)
    failed = dict.fromkeys(COLUMN_NAMES)
    failed.update(cohort="demo", StudyInstanceUID="1.2.3.999", status="failed", error="broken")
    return [*rows, failed], labels


def run_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> str:
    rows, labels = results()
    path = write_results(rows, tmp_path / f"results{suffix}")
    label_file = tmp_path / "labels.csv"
    with label_file.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["StudyInstanceUID", "label"])
        writer.writerows(labels.items())
    monkeypatch.setenv("COHORT_RESULTS", str(path))
    monkeypatch.setenv("COHORT_LABELS", str(label_file))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    text = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", ""))
            if "data" in output:
                text.append(" ".join(output["data"]))
    return "\n".join(text)


class TestCohortAnalysisNotebook:
    def test_parquet_results_with_labels(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        out = run_notebook(tmp_path, monkeypatch, ".parquet")
        assert "21 rows, 21 studies" in out
        assert "{'done': 20, 'failed': 1}" in out
        assert "hemorrhage: n=20, flagged rate 50.0%" in out
        assert "AUC = 1.000" in out  # the synthetic scores separate the labels perfectly
        assert "image/png" in out  # histogram and ROC were drawn
