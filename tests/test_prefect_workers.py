"""A real Prefect server on 127.0.0.1, the project's prefect.yaml deployed to a `process` work pool,
two workers, two flow runs: both complete, one on each worker."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_team_setup import env, free_port, start, stop, wait_http

pytestmark = pytest.mark.e2e
CODE = ("flows", "tasks", "cv_models", "prefect.yaml")


def wait_for_line(log: Path, line: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    """Until ``line`` is in the worker's log (or the worker died, or ``seconds`` passed: the assertion says)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and proc.poll() is None and line not in log.read_text():
        time.sleep(0.5)


def prefect(*args, cwd: Path, **extra) -> subprocess.CompletedProcess:
    out = subprocess.run(["prefect", *args], cwd=cwd, capture_output=True, text=True, env=env(**extra), timeout=300)
    assert out.returncode == 0, " ".join(args) + "\n" + out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_two_workers_on_a_process_pool_each_complete_a_flow_run(project, tmp_path):
    for name in CODE:  # the project folder holds the code, as a clone would
        src = REPO / name
        (
            shutil.copytree(src, project.root / name, ignore=shutil.ignore_patterns("__pycache__"))
            if src.is_dir()
            else shutil.copy(src, project.root / name)
        )
    from tasks.config import load_params
    from tasks.track.tracking import ensure_store

    ensure_store(load_params(project.params()))  # the MLflow schema once, before two runs at once (it can race)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    # workers poll every second, so the second run is picked up while the first still runs
    common = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "PYTHONPATH": str(project.root),
    }
    server_log = tmp_path / "server.log"
    server = start(
        ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        server_log,
        **{k: v for k, v in common.items() if k != "PREFECT_API_URL"},
    )
    workers = []
    try:
        wait_http(f"{api}/health", server, server_log, seconds=180)
        prefect("work-pool", "create", "cv-pool", "--type", "process", cwd=project.root, **common)
        prefect("--no-prompt", "deploy", "--all", cwd=project.root, **common)
        # Which polling worker claims a queued run is a race, so the test hands each worker its run in turn:
        # worker-a alone on the pool takes run 1; then worker-b alone takes run 2 from the same pool.
        runs, logs = [], {}
        for name, task_name in (("worker-a", "classification"), ("worker-b", "segmentation")):
            log = tmp_path / f"{name}.log"
            proc = subprocess.Popen(
                ["prefect", "worker", "start", "--pool", "cv-pool", "--name", name],
                cwd=project.root,
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
                env=env(**common),
                start_new_session=True,
            )
            workers.append(proc)
            try:
                out = prefect(
                    "deployment",
                    "run",
                    "validate-data/pool",
                    "--param",
                    f"task_name={task_name}",
                    cwd=project.root,
                    **common,
                )
                run_id = next(
                    w for line in out.stdout.splitlines() if "UUID" in line for w in line.split() if w.count("-") == 4
                )
                runs += wait_for_runs([run_id], api, timeout=300)
                # the API says COMPLETED a moment before the flow's process has printed its last line
                wait_for_line(log, f"Flow run '{runs[-1]['name']}' - Finished in state Completed", proc)
            finally:
                stop(proc)
            logs[name] = log.read_text()
        assert [r["state"] for r in runs] == ["COMPLETED", "COMPLETED"], (runs, logs)
        for (name, text), run in zip(logs.items(), runs):  # the worker that ran it logs its end
            assert f"Flow run '{run['name']}' - Finished in state Completed" in text, (name, text)
        assert len({r["infrastructure_pid"] for r in runs}) == 2
        assert all(r["work_pool_name"] == "cv-pool" for r in runs)
    finally:
        for proc in workers:
            stop(proc)
        stop(server)


def wait_for_runs(ids: list[str], api: str, timeout: float) -> list[dict]:
    """Poll the server's REST API (GET /flow_runs/{id}) until every run is final; a request costs nothing next to a
    Python process importing Prefect's client, which the two flow runs would have to share the 2 cores with."""
    deadline = time.time() + timeout
    while True:
        runs = []
        for run_id in ids:
            with urllib.request.urlopen(f"{api}/flow_runs/{run_id}", timeout=30) as response:
                r = json.loads(response.read())
            runs.append(
                {
                    "name": r["name"],
                    "state": r["state_type"],
                    "infrastructure_pid": r["infrastructure_pid"],
                    "work_pool_name": r["work_pool_name"],
                }
            )
        if all(r["state"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs) or time.time() > deadline:
            return runs
        time.sleep(2)
