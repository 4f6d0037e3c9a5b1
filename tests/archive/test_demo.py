"""``pacs-triage demo`` end to end: phantoms and the real CT through a node, the shipped model.

Runs the command as a newcomer would (``--exit`` so that it returns), with the
models shipped in the repository: the synthetic head CT with a hemorrhage must
come first, the one without after it, and the real (abdominal) CT must show
its state honestly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from archive.db import Database
from archive.index import ReadingStatus, Study
from tests.peers import REPO_ROOT

pytestmark = pytest.mark.network

LINE = re.compile(r"^\s+(\d+)\. (\S+)\s+(.*?)\s+\[(.*)\]$")


def test_demo_lists_the_positive_first_and_the_real_ct_honestly(
    tmp_path: Path, ct_series_files: list[Path]
) -> None:
    data_dir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_TRIAGE_")}
    env.pop("PREFECT_API_URL", None)
    env["PYTHONPATH"] = str(REPO_ROOT)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "archive.cli",
            "demo",
            "--exit",
            "--data-dir",
            str(data_dir),
            "--real-ct",
            str(ct_series_files[0].parent),
            "--timeout",
            "400",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = run.stdout
    assert run.returncode == 0, output + run.stderr[-4000:]
    rows = [m.groups() for line in output.splitlines() if (m := LINE.match(line))]
    labels = [label for _, _, _, label in rows]
    assert labels[0] == "synthetic head CT with hemorrhage", output
    assert rows[0][1] == "STAT" and "Intracranial hemorrhage" in rows[0][2], output
    (negative,) = [r for r in rows if r[3] == "synthetic head CT without hemorrhage"]
    assert negative[1] == "ROUTINE" and "No finding above threshold" in negative[2], output
    # The abdominal CT matches no model's selection rule, and says so.
    (real,) = [r for r in rows if r[3].startswith("real CT")]
    assert real[1] == "-" and real[2] == "No applicable AI model", output
    assert re.search(r"Worklist page: http://127\.0\.0\.1:\d+/worklist", output)
    assert re.search(r"Log in with the token: \S{20,}", output)
    # The positive's key image was stored in its study.
    db = Database(f"sqlite:///{data_dir / 'index.sqlite'}")
    try:
        with db.reader() as session:
            key_images = session.scalars(
                select(ReadingStatus.key_image_sop_instance_uid)
                .join(Study, Study.id == ReadingStatus.study_pk)
                .where(ReadingStatus.key_image_sop_instance_uid.is_not(None))
            ).all()
    finally:
        db.dispose()
    assert len(key_images) == 1
