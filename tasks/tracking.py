"""MLflow bookkeeping: one experiment per CV task, one parent run per pipeline run,
one child run per stage carrying params, seeds, git commit, data version, metrics and artifacts."""
from __future__ import annotations

import hashlib
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from tasks.config import Params, TaskConfig, flatten


def tracking_uri(params: Params) -> str:
    """``MLFLOW_TRACKING_URI`` wins; a relative sqlite path is made absolute (stages may run elsewhere)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def artifact_root(params: Params) -> Path:
    return Path(os.environ.get("CV_MLFLOW_ARTIFACT_ROOT") or params.tracking.artifact_root).resolve()


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def data_version(data_path: str) -> str:
    """The DVC hash of the dataset folder as recorded in dvc.lock (``unknown`` before the first repro)."""
    lock = Path("dvc.lock")
    if not lock.exists():
        return "unknown"
    want = Path(data_path).as_posix().rstrip("/")
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for entry in stage.get("outs", []) + stage.get("deps", []):
            if Path(entry["path"]).as_posix().rstrip("/") == want:
                return entry.get("md5") or entry.get("hash", "unknown")
    return "unknown"


def default_pipeline_run_id(params_path: str = "params.yaml") -> str:
    """Stages of one ``dvc repro`` share an id: the commit and the params they ran with."""
    text = Path(params_path).read_text() if Path(params_path).exists() else ""
    return hashlib.sha256((git_commit() + text).encode()).hexdigest()[:12]


def ensure_store(params: Params) -> None:
    """Create the SQLite schema once, before any fan-out (parallel schema creation can race)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params))
    mlflow.MlflowClient().search_experiments(max_results=1)


def experiment_id(params: Params, task_name: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params))
    client = mlflow.MlflowClient()
    name = params.tracking.experiment_prefix + task_name
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # against a tracking server (http://...) the server decides, and proxies the uploads (--serve-artifacts):
    # a local folder here would be this machine's only, invisible to the server and to teammates
    remote = tracking_uri(params).startswith(("http://", "https://"))
    location = None if remote else (artifact_root(params) / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags={"cv_task": task_name})
    except Exception:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def parent_run(params: Params, task_name: str, pipeline_run_id: str) -> str:
    """The run that groups one pipeline run's stages in the MLflow UI (found or created)."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = experiment_id(params, task_name)
    found = client.search_runs(
        [exp], filter_string=f"tags.pipeline_run_id = '{pipeline_run_id}' and tags.kind = 'pipeline'", max_results=1
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        exp, run_name=f"pipeline {pipeline_run_id}",
        tags={"pipeline_run_id": pipeline_run_id, "kind": "pipeline", "cv_task": task_name, "git_commit": git_commit()},
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def close_stale_runs(params: Params) -> list[str]:
    """Runs left RUNNING by a killed stage (``kill -9``, out of memory) end FAILED with a note."""
    import mlflow

    from tasks import runstate

    mlflow.set_tracking_uri(tracking_uri(params))
    stale = runstate.mark_stale_runs(mlflow.MlflowClient())
    for run_id in stale:
        print(f"[mlflow] run {run_id} was left RUNNING by a process that no longer exists: marked FAILED")
    return stale


def run_data_version(task_name: str, cfg: TaskConfig) -> dict[str, str]:
    """The validate stage's digest of every file (works for data outside DVC), and DVC's hash where known."""
    from tasks.data_version import read_data_version

    dvc_hash = data_version(cfg.data.path)
    digest = read_data_version(task_name)["digest"]
    return {"data_version": digest if digest != "unknown" else dvc_hash, "dvc_data_version": dvc_hash}


@contextmanager
def stage_run(params: Params, task_name: str, stage: str, cfg: TaskConfig | None, seeds: dict, pipeline_run_id: str | None,
              extra_params: dict | None = None) -> Iterator[str]:
    """An active MLflow run for one stage, nested under the pipeline run. Yields the run id.

    The run ends FAILED if the stage raises and KILLED if it is interrupted (SIGTERM, SIGINT), so the store never
    holds a half-finished "running" stage; runs of killed processes are closed by the next stage (close_stale_runs).
    """
    import mlflow

    from tasks import runstate

    pipeline_run_id = pipeline_run_id or os.environ.get("CV_PIPELINE_RUN_ID") or default_pipeline_run_id()
    close_stale_runs(params)
    parent = parent_run(params, task_name, pipeline_run_id)
    tags = {
        "mlflow.parentRunId": parent, "pipeline_run_id": pipeline_run_id, "kind": "stage", "stage": stage,
        "cv_task": task_name, "git_commit": git_commit(), **runstate.owner_tags(),
    }
    if cfg is not None:
        tags.update(run_data_version(task_name, cfg))
    run = mlflow.start_run(experiment_id=experiment_id(params, task_name), run_name=stage, tags=tags)
    try:
        logged = {**seeds, **(extra_params or {})}
        if cfg is not None:
            logged.update(flatten(cfg.model_dump(mode="json")))
        mlflow.log_params({k: str(v)[:6000] for k, v in logged.items()})
        yield run.info.run_id
    except KeyboardInterrupt:  # SIGINT, or SIGTERM turned into runstate.StageInterrupted
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")
