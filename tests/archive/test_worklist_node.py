"""End to end through a running node: storescu in, worklist order, key image, one alert.

A ``pacs-triage serve`` process with a tiny real MONAI bundle for head CT
(models.testing) receives a synthetic head CT and the real abdominal CT by
dcmtk's storescu; the worklist API lists the head CT first (STAT, with its key
image stored in the study) and the real CT with its honest state (no model
applies to it); a real webhook receiver gets exactly one alert, also after
the node restarts.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from models.phantoms import write_head_ct
from models.testing import make_bundle
from tests.peers import NodeProcess, storescu
from tests.worklist_support import WebhookReceiver

pytestmark = pytest.mark.network

HEAD_RULE = {"modality": ["CT"], "body_part": ["HEAD"], "body_part_keywords": ["HEAD"]}
TIMEOUT = 180.0
FINAL = ("triaged", "no_applicable_model", "failed")


def worklist(node: NodeProcess) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        f"{node.http_url}/api/worklist?reading_state=all", headers=node.auth_headers
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["items"]


def wait_for(condition: Callable[[], Any], what: str, node: NodeProcess) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; node log:\n{node.log()[-6000:]}")


def test_head_ct_first_with_key_image_real_ct_honest_and_one_alert(
    dcmtk: None, tmp_path: Path, ct_series_files: list[Path]
) -> None:
    models_dir = tmp_path / "models"
    make_bundle(
        models_dir,
        name="ich-test",
        version="1.0.0",
        probability=0.95,
        rule=HEAD_RULE,
        with_mask=True,
    )
    head = write_head_ct(tmp_path / "head", positive=True, seed=3, patient_id="WL-3", slices=24)
    head_uid = str(pydicom.dcmread(head[0]).StudyInstanceUID)
    ct_uid = str(pydicom.dcmread(ct_series_files[0]).StudyInstanceUID)
    with WebhookReceiver() as receiver:
        env = {
            **{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
            "PACS_TRIAGE_MODELS_DIRS": json.dumps([str(models_dir)]),
            "PACS_TRIAGE_STABLE_AFTER_SECONDS": "2",
            "PACS_TRIAGE_STABLE_AFTER_RELEASE_SECONDS": "0.5",
            "PACS_TRIAGE_DICOM_WORKERS": "1",
            "PACS_TRIAGE_FSYNC": "false",
            "PACS_TRIAGE_NODE_NAME": "worklist-node",
            "PACS_TRIAGE_ALERT_WEBHOOKS": json.dumps([{"name": "pager", "url": receiver.url}]),
        }
        node = NodeProcess(tmp_path / "node", env=env, triage=True)
        with node:
            assert storescu(node.dicom_port, ct_series_files, called="PACS_TRIAGE").returncode == 0
            assert storescu(node.dicom_port, head, called="PACS_TRIAGE").returncode == 0
            items = wait_for(
                lambda: (
                    (w := worklist(node))
                    and len(w) == 2
                    and all(i["triage_state"] in FINAL for i in w)
                    # the follow-up (SR summary, key image) comes a moment after the state
                    and any(i["key_image_sop_instance_uid"] for i in w)
                    and w
                ),
                "both studies triaged",
                node,
            )
            assert [i["StudyInstanceUID"] for i in items] == [head_uid, ct_uid]
            top, real = items
            assert top["priority_class"] == "STAT"
            assert (
                top["headline"].startswith("Intracranial hemorrhage")
                and "(p=0.95)" in top["headline"]
            )
            assert top["key_image_sop_instance_uid"]
            assert real["triage_state"] == "no_applicable_model"
            assert real["headline"] == "No applicable AI model"
            wait_for(lambda: len(receiver.requests) == 1, "the alert", node)

        # A restarted node owes nothing: the alert was recorded as sent.
        node = NodeProcess(tmp_path / "node", env=env, triage=True)
        with node:
            time.sleep(3)
            assert len(worklist(node)) == 2
        (_headers, body), *others = receiver.requests
        assert others == []
        assert body["StudyInstanceUID"] == head_uid
        assert body["priority_class"] == "STAT"
        assert body["key_image_sop_instance_uid"] == top["key_image_sop_instance_uid"]
        assert "Phantom" not in node.log() and "WL-3" not in node.log()
