"""DDP through torchrun on the CPU (2 processes, gloo): the averaged gradient equals one process's
on the same global batch; a short torchrun training matches the one-process run at the same global
batch; only rank 0 writes and logs; the evaluate stage accepts the model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import normstats
from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


def torchrun(*args, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = ["torchrun", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


@pytest.mark.parametrize("task_name", ["classification", "detection"])
def test_ddp_gradient_equals_one_process_gradient(project, task_name):
    extra = {"tasks.detection.image_size": 64, "tasks.detection.model.options.anchor_size": 12} if task_name == "detection" else {}
    params = project.params(**extra)
    normstats.run(task_name, params)  # the detector's input statistics
    torchrun(REPO / "tests/ddp_gradcheck.py", task_name, params, project.root / "grad.json", cwd=project.root)
    r = json.loads((project.root / "grad.json").read_text())
    assert r["world"] == 2 and r["local_batch"] * 2 == r["global_batch"]
    assert r["max_abs_grad"] > 1e-3  # a real gradient, not zeros
    assert r["max_abs_diff"] < 1e-5, r
