"""Stages that are interrupted end in a true state: SIGTERM ends the MLflow run KILLED at once and leaves no
temporary folder; after ``kill -9`` the next start marks the orphaned run FAILED, removes the orphaned
folder and resumes, giving the same model and metrics as an uninterrupted run; different stages run side
by side. Real subprocesses, a real MLflow SQLite store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.test_bad_input import cli, leftovers, runs_of

pytestmark = pytest.mark.e2e

# tiny and quick: no normalisation statistics, no overfit check; enough epochs to interrupt one in the middle
SETTINGS = {
    "tasks.classification.normalization": "none",
    "tasks.classification.overfit_check.enabled": False,
    "tasks.classification.train.epochs": 3,
    "tasks.classification.train.track_train_metric": False,
}
CKPT = Path("checkpoints/classification/baseline/last.pt")


def wait_for_checkpoint(root: Path, proc, timeout: float = 240) -> int:
    """Wait until the stage has written a resume checkpoint (an epoch is done); returns that epoch."""
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, f"stage ended before its first checkpoint: {proc.communicate()[1][-2000:]}"
        if (root / CKPT).exists():
            try:
                return int(torch.load(root / CKPT, weights_only=True)["epoch"])
            except Exception:  # noqa: BLE001 - being replaced this instant: look again
                pass
        time.sleep(0.05)
    raise TimeoutError("no checkpoint written")


def outputs(root: Path) -> tuple[dict, bytes, bytes]:
    model = torch.load(root / "models/classification/baseline/model.pt", weights_only=True)["model"]
    return (
        model,
        (root / "outputs/classification/baseline/metrics.json").read_bytes(),
        (root / "outputs/classification/baseline/history.csv").read_bytes(),
    )


def test_kill_9_then_rerun_marks_the_run_failed_and_resumes_to_the_same_result(project, capfd):
    from tasks.cli import main

    project.params(**SETTINGS)
    assert main(["baseline", "--task", "classification"]) == 0  # the uninterrupted reference
    reference = outputs(project.root)
    assert "train_seconds" not in json.loads(reference[1])  # wall-clock time lives in timings.json
    assert "train_seconds" in json.loads((project.root / "outputs/classification/baseline/timings.json").read_text())
    # the finished run's checkpoint stays, marked done: outputs lost after training (a kill before DVC wrote its
    # lock file) come back from a rerun without training again, bit for bit
    assert torch.load(project.root / CKPT, weights_only=True)["done"]
    shutil.rmtree(project.root / "models")
    shutil.rmtree(project.root / "outputs/classification/baseline")
    capfd.readouterr()
    assert main(["baseline", "--task", "classification"]) == 0
    assert "(training had finished)" in capfd.readouterr().out
    assert outputs(project.root)[1:] == reference[1:]
    shutil.rmtree(project.root / "models")
    shutil.rmtree(project.root / "outputs/classification/baseline")
    (project.root / CKPT).unlink()  # and now an interrupted run from the start

    proc = cli(project.root, "baseline", "classification")
    epoch = wait_for_checkpoint(project.root, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert epoch < SETTINGS["tasks.classification.train.epochs"]
    [orphan] = runs_of(proc.pid)
    assert orphan.info.status == "RUNNING"  # what a killed process leaves behind
    assert [p for p in leftovers(project.root) if f".tmp-{proc.pid}-" in p.name]  # and its temporary folder

    capfd.readouterr()
    assert main(["baseline", "--task", "classification"]) == 0
    out = capfd.readouterr().out
    import mlflow

    run = mlflow.MlflowClient().get_run(orphan.info.run_id)
    assert run.info.status == "FAILED" and "ended without closing this run" in run.data.tags["cv.note"]
    assert not leftovers(project.root)
    resumed_from = int(
        out.split("resuming from checkpoints/classification/baseline/last.pt after epoch ")[1].split()[0]
    )
    assert resumed_from >= epoch  # at most the interrupted epoch is redone
    model, metrics, history = outputs(project.root)
    assert metrics == reference[1] and history == reference[2]  # bit for bit
    assert model.keys() == reference[0].keys()
    assert all(torch.equal(model[k], reference[0][k]) for k in model)


def test_sigterm_ends_the_run_killed_at_once_without_leftovers(project):
    project.params(**SETTINGS)
    proc = cli(project.root, "baseline", "classification")
    wait_for_checkpoint(project.root, proc)
    os.kill(proc.pid, signal.SIGTERM)
    sent = time.time()
    _, err = proc.communicate(timeout=120)
    took = time.time() - sent
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err[-2000:]
    assert took < 30, f"took {took:.0f} s to stop"
    [run] = runs_of(proc.pid)
    assert run.info.status == "KILLED"
    assert not leftovers(project.root)
    assert not (project.root / "models/classification/baseline").exists()
    assert (project.root / CKPT).exists()  # kept: the next run resumes from it


def test_different_stages_run_side_by_side(project):
    """Two stages at once in one folder (one SQLite store): each has its own lock, neither waits or fails."""
    project.params(**SETTINGS)
    procs = [cli(project.root, "validate", task) for task in ("classification", "segmentation")]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
        assert "database is locked" not in err + out
        assert [r.info.status for r in runs_of(p.pid)] == ["FINISHED"]
