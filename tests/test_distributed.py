"""DDP through torchrun on the CPU (2 processes, gloo): the averaged gradient equals one process's
on the same global batch; a short torchrun training matches the one-process run at the same global
batch; only rank 0 writes and logs; the evaluate stage accepts the model."""

from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    extra = (
        {"tasks.detection.image_size": 64, "tasks.detection.model.options.anchor_size": 12}
        if task_name == "detection"
        else {}
    )
    params = project.params(**extra)
    normstats.run(task_name, params)  # the detector's input statistics
    torchrun(REPO / "tests/ddp_gradcheck.py", task_name, params, project.root / "grad.json", cwd=project.root)
    r = json.loads((project.root / "grad.json").read_text())
    print(
        f"{task_name}: max |DDP grad - one-process grad| = {r['max_abs_diff']:.2e} (largest gradient {r['max_abs_grad']:.2e})"
    )
    assert r["world"] == 2 and r["local_batch"] * 2 == r["global_batch"]
    assert r["max_abs_grad"] > 1e-3  # a real gradient, not zeros
    assert r["max_abs_diff"] < 1e-5, r


# Global batch 16 (8 per process: BatchNorm statistics of 4 images per process made the runs drift apart), every augmentation off: the one-process "baseline" and the 2-process
# "augmented" stage train the same configuration, so the evaluate stage scores both side by side.
# Stated tolerance: the test metric of the 2-process run is within TOLERANCE of the one-process run
# (the runs differ in data order, per-rank augmentation seeds and per-process BatchNorm statistics).
SHORT = {
    "classification": ({"tasks.classification.train.epochs": 12, "tasks.classification.train.batch_size": 16}, 0.15),
    "detection": (
        {
            "tasks.detection.image_size": 64,
            "tasks.detection.model.options.anchor_size": 12,
            "tasks.detection.train.epochs": 2,
        },
        0.10,
    ),
}


# detection under torchrun: make test-all (suite budget); classification covers the DDP mechanics in make test
@pytest.mark.parametrize(
    "task_name", [pytest.param(t, marks=pytest.mark.slow) if t == "detection" else t for t in SHORT]
)
def test_torchrun_training_matches_one_process_and_evaluates(project, task_name):
    import mlflow

    from tasks import baseline, evaluate

    settings, tolerance = SHORT[task_name]
    if task_name == "classification":  # two well-separated classes, which the tiny model learns in a few epochs
        for folder in project.classification.glob("*/*"):
            if folder.name in ("square", "triangle"):
                shutil.rmtree(folder)
    t = f"tasks.{task_name}."
    params = project.params(
        **{
            t + "augment": {},
            t + "train.batch_size": 16,
            t + "train.eval_batch_size": 16,
            t + "train.num_threads": 1,
            t + "overfit_check.enabled": False,
            t + "preview_samples": 4,
            t + "train.track_train_metric": False,
            **settings,
        }
    )
    normstats.run(task_name, params)
    baseline.run(task_name, params)  # one process
    out = torchrun(
        "-m", "tasks", "augmented", "--task", task_name, "--params", params, cwd=project.root
    )  # two processes
    assert "augmented" in out.stdout
    metrics = evaluate.run(task_name, params)  # the evaluate stage accepts the DDP-trained model
    primary = "accuracy" if task_name == "classification" else "map50"
    one, two = metrics["baseline"][primary], metrics["augmented"][primary]
    print(f"{task_name} test {primary}: one process {one:.4f}, two processes {two:.4f}")
    assert abs(one - two) <= tolerance, (one, two)
    if task_name == "classification":  # both learned something
        assert min(one, two) > metrics["dummy"][primary] + 0.1, metrics
    history = Path(f"outputs/{task_name}/augmented/history.csv").read_text().splitlines()
    assert len(history) == 1 + settings[t + "train.epochs"]
    assert torch.load(f"checkpoints/{task_name}/augmented/last.pt", weights_only=True)[
        "done"
    ]  # rank 0 marked it finished
    assert not list(Path(f"outputs/{task_name}").glob(".augmented.tmp-*"))
    # rank 0 alone opened an MLflow run: exactly one 2-process augmented run, with its metrics and model
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    exp = mlflow.get_experiment_by_name(f"cv-{task_name}")
    runs = mlflow.search_runs(
        [exp.experiment_id], filter_string="params.processes = '2' and tags.kind = 'stage'", output_format="list"
    )
    assert len(runs) == 1 and runs[0].data.tags["mlflow.runName"] == "augmented"
    assert f"best_val_{primary}" in runs[0].data.metrics
    names = [a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "model")]
    assert names == ["model/model.pt"], names
