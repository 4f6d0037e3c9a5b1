"""Checks shared by the tests of the shipped demo bundles (ich_ct_demo, ptx_dx_demo).

A series descriptor built from the headers a flow would read, and the check
that the bundle's own ``scripts/evaluate.py``, run on the committed weights,
reproduces its committed docs/evaluation.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from models.registry import InstalledModel
from pipeline.selection import SeriesDescriptor

REPO = Path(__file__).resolve().parents[1]


def series_descriptor(datasets: list[pydicom.Dataset]) -> SeriesDescriptor:
    """The descriptor series selection sees for a series of `datasets` (headers suffice)."""
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


def assert_evaluation_reproduces(
    bundle: Path, model: InstalledModel, *, rate_tolerance: float
) -> None:
    """Run the bundle's evaluate.py on as many test phantoms as committed; compare the numbers.

    The weights and threshold must match exactly, the AUC within 0.01, and
    sensitivity and specificity within `rate_tolerance` (a phantom or two).
    """
    committed = json.loads((bundle / "docs" / "evaluation.json").read_text())
    assert committed["weights_sha256"] == model.identity.weights_sha256
    done = subprocess.run(
        [sys.executable, str(bundle / "scripts" / "evaluate.py"), "--n", str(committed["n_test"])],
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
    assert measured["sensitivity"] == pytest.approx(committed["sensitivity"], abs=rate_tolerance)
    assert measured["specificity"] == pytest.approx(committed["specificity"], abs=rate_tolerance)
