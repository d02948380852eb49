"""The BCCD benchmark script end to end on the real data, shrunk to seconds: the zero-size boxes are
named, the crops pretrain a backbone that starts the detector, and the test split is scored (its per-image
results rescore to the printed mAP with pycocotools)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.detection_helpers import BCCD, BCCD_MISSING

TINY = [
    "crops.size=16",
    "pretrain.image_size=16",
    "pretrain.epochs=1",
    "tasks.detection.image_size=96",
    "tasks.detection.train.epochs=1",
    "tasks.detection.train.eval_batch_size=32",
]


@pytest.mark.skipif(not BCCD.is_dir(), reason=BCCD_MISSING)
@pytest.mark.slow  # make test-all: the benchmark's chain on real data (suite budget)
def test_bccd_benchmark_runs_the_crops_pretrain_detector_chain(tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "bccd_detection.py"),
        "--bccd",
        str(BCCD),
        "--keep",
        str(tmp_path / "run"),
        "--budget-minutes",
        "5",
    ] + [a for kv in TINY for a in ("--set", kv)]
    env = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CV_PIPELINE_RUN_ID")
    }  # the script's own
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "BloodImage_00338.xml" in out and "BloodImage_00343.xml" in out  # the two zero-size boxes, dropped and named
    assert "within the 5-minute budget" in out
    result = json.loads((tmp_path / "run" / "bccd_result.json").read_text())
    assert result["pretrain"] == "crops" and {"crops", "pretrain", "train", "test"} <= set(result["seconds"])
    assert 0.0 <= result["test"]["map50"] <= 1.0 and set(result["test"]) >= {"ap50/RBC", "ap50/WBC", "ap50/Platelets"}
    # the test split's boxes (original pixels) and ground truth, rescored as details/RECOMPUTE.md says
    from tests.test_use_model import recompute_snippet

    rescored = recompute_snippet(tmp_path / "run" / "details", "augmented")["printed"]  # what the lines print
    assert rescored["map50"] == pytest.approx(result["test"]["map50"], abs=1e-9)
    crops = tmp_path / "run" / "data" / "crops" / "bccd"
    assert sorted(p.name for p in crops.iterdir()) == ["Platelets", "RBC", "WBC"]
