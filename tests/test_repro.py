"""``python -m tasks repro --jobs 2`` (make run): two tasks' chains at once through DVC's own locks, ending with
what ``dvc repro`` leaves (every stage in dvc.lock, nothing left to run) and the two chains' stages overlapping
in time (their MLflow stage runs)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import tiny_task
from tests.test_e2e_classification import _env, dvc, make_repo

pytestmark = pytest.mark.e2e
TASKS = ["classification", "segmentation"]


@pytest.fixture(scope="module")
def two_lanes(tmp_path_factory):
    overrides = {k: v for t in TASKS for k, v in tiny_task(t).items()}
    repo = make_repo(tmp_path_factory.mktemp("lanes") / "repo", keep_tasks=TASKS, **overrides)
    out = subprocess.run(
        [sys.executable, "-m", "tasks", "repro", "--jobs", "2"],
        cwd=repo,
        capture_output=True,
        text=True,
        env=_env(CV_PIPELINE_RUN_ID="e2e-lanes"),
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    return repo, out.stdout


def test_every_stage_of_both_tasks_ran_once_and_dvc_finds_nothing_to_do(two_lanes):
    repo, stdout = two_lanes
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for task in TASKS:
        for stage in ("validate", "normstats", "baseline", "augmented", "evaluate"):
            assert f"{stage}@{task}" in lock
            assert stdout.count(f"[{task}] Running stage '{stage}@{task}'") == 1, stdout[-3000:]
    status = dvc(repo, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout


def test_the_two_chains_ran_side_by_side(two_lanes):
    import mlflow

    client = mlflow.MlflowClient()
    spans = {}
    for task in TASKS:
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            f"tags.pipeline_run_id = 'e2e-lanes' and tags.kind = 'stage' and tags.cv_task = '{task}'",
        )
        assert {r.data.tags["stage"] for r in runs} >= {"baseline", "augmented", "evaluate"}
        spans[task] = (min(r.info.start_time for r in runs), max(r.info.end_time for r in runs))
    (a0, a1), (b0, b1) = spans.values()
    assert max(a0, b0) < min(a1, b1), spans  # the two chains' time spans overlap
