"""The team setup on real engines, all on 127.0.0.1: a stage logging to an MLflow tracking server
(SQL backend, proxied artifact store); a DVC remote pushed from one clone and pulled into another.
The Prefect work pool with two workers is in tests/test_prefect_workers.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    out = dict(os.environ, **extra)
    out["PATH"] = str(Path(sys.executable).parent) + os.pathsep + out["PATH"]
    return out


def wait_http(url: str, proc: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {seconds} s: {log.read_text()[-3000:]}")


def start(cmd: list[str], log: Path, **extra_env) -> subprocess.Popen:
    """A server in its own process group, so that stopping it stops the workers it forks."""
    return subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env(**extra_env), start_new_session=True
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    log = tmp_path / "mlflow-server.log"
    proc = start(
        [
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(store / "artifacts"),
        ],
        log,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        yield f"http://127.0.0.1:{port}", store
    finally:
        stop(proc)


def test_stage_logs_to_an_mlflow_tracking_server(project, mlflow_server, monkeypatch):
    """tracking.uri: http://... sends the stage's run, params, metrics and artifacts to the server; the
    artifacts travel through it (proxied) into its artifact store, nothing is written locally."""
    import mlflow

    from tasks import normstats

    uri, store = mlflow_server
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the test session's own store would win over params.yaml
    params = project.params(**{"tracking.uri": uri})
    summary = normstats.run("classification", params)

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("cv-classification")
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location  # proxied by the server
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'normstats'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["seed"] == "42" and run.data.params["image_size"] == "32"
    assert run.data.metrics["mean.r"] == pytest.approx(summary["per_channel_mean"][0])
    names = sorted(a.path for a in client.list_artifacts(run.info.run_id, "normstats"))
    assert names == ["normstats/mean_image.npy", "normstats/mean_image.png", "normstats/stats.json"]
    got = Path(client.download_artifacts(run.info.run_id, "normstats/stats.json", str(project.root / "dl")))
    assert json.loads(got.read_text())["n_images"] == summary["n_images"]
    assert list((store / "artifacts").rglob("stats.json")), "artifact not in the server's store"
    assert not (project.root / "mlartifacts").exists() and not (project.root / "mlflow.db").exists()


# ---------------------------------------------------------------- DVC remote


def git(folder: Path, *args) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder, check=True, capture_output=True
    )


def dvc(folder: Path, *args, timeout: int = 900) -> subprocess.CompletedProcess:
    out = subprocess.run(
        ["dvc", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        env=env(CV_PIPELINE_RUN_ID="e2e-remote"),
        timeout=timeout,
    )
    assert out.returncode == 0, " ".join(args) + "\n" + out.stdout[-3000:] + out.stderr[-3000:]
    return out


TARGET = "baseline@classification"  # generate, validate, normstats, baseline: the shortest chain with a model


def test_dvc_push_then_pull_into_a_second_clone_reproduces_nothing(tmp_path):
    """Clone A runs the pipeline up to the baseline model and pushes to a local-folder remote; clone B
    (same commit) pulls, and its `dvc repro` retrains nothing: the same model bytes and metrics."""
    from tests.test_e2e_classification import make_repo

    tiny = {
        "tasks.classification.train.epochs": 1,
        "tasks.classification.overfit_check.enabled": False,
        "shapes.classification.num_images": 96,
        "pretrain.epochs": 1,
    }
    origin = make_repo(tmp_path / "origin", keep_tasks=["classification"], **tiny)
    remote = tmp_path / "dvc-remote"
    dvc(origin, "remote", "add", "-d", "shared", str(remote))
    git(origin, "add", "-A")
    git(origin, "commit", "-qm", "a local-folder DVC remote")
    a = tmp_path / "a"
    git(tmp_path, "clone", "-q", str(origin), str(a))
    dvc(a, "repro", TARGET)
    git(a, "add", "-A")
    git(a, "commit", "-qm", "pipeline results (dvc.lock)")
    dvc(a, "push")
    assert any(remote.rglob("*")), "nothing pushed"

    b = tmp_path / "b"
    git(tmp_path, "clone", "-q", str(a), str(b))
    model = "models/classification/baseline/model.pt"
    assert not (b / model).exists()
    dvc(b, "pull", "--with-deps", TARGET)
    repro = dvc(b, "repro", TARGET)
    assert "Running stage" not in repro.stdout, repro.stdout[-3000:]  # everything up to date: nothing retrained
    metrics = "outputs/classification/baseline/metrics.json"
    assert json.loads((b / metrics).read_text()) == json.loads((a / metrics).read_text())
    assert (b / model).read_bytes() == (a / model).read_bytes()
    assert (b / "outputs/classification/normstats/stats.json").exists()
    assert "up to date" in dvc(b, "status", TARGET).stdout
