"""MLflow bookkeeping: one experiment per CV task, one parent run per pipeline run,
one child run per stage carrying params, seeds, git commit, data version, metrics and artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from tasks.config import Params, TaskConfig, flatten


def tracking_uri(params: Params) -> str:
    """``MLFLOW_TRACKING_URI`` wins; a relative sqlite path is made absolute (stages may run elsewhere)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def artifact_root(params: Params) -> Path:
    return Path(os.environ.get("CV_MLFLOW_ARTIFACT_ROOT") or params.tracking.artifact_root).resolve()


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout
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


def _code_diff() -> str:
    """Uncommitted changes to the code (not to dvc.lock or outputs, which every stage rewrites)."""
    try:
        return subprocess.run(["git", "diff", "HEAD", "--", "*.py", "dvc.yaml"], capture_output=True, text=True).stdout
    except OSError:
        return ""


def default_pipeline_run_id(params_path: str | Path = "params.yaml", overrides: dict | None = None) -> str:
    """Stages of one ``dvc repro`` share an id; two runs that could differ never do.

    The id covers the commit and uncommitted code, params.yaml, the ``--set`` overrides and the
    ``dvc exp run`` experiment name, so every stage process finds the same parent run without talking
    to the others. (Not ``git_commit()``'s ``-dirty``: dvc.lock changes between stages.)
    """
    text = Path(params_path).read_text() if Path(params_path).exists() else ""
    head = git_commit().removesuffix("-dirty")
    parts = [
        head,
        _code_diff(),
        text,
        json.dumps(overrides or {}, sort_keys=True, default=str),
        os.environ.get("DVC_EXP_NAME", ""),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]


def resolve_pipeline_run_id(
    pipeline_run_id: str | None, params_path: str | Path = "params.yaml", overrides: dict | None = None
) -> str:
    """An explicit id (argument, then ``CV_PIPELINE_RUN_ID``) wins; otherwise the deterministic default."""
    return pipeline_run_id or os.environ.get("CV_PIPELINE_RUN_ID") or default_pipeline_run_id(params_path, overrides)


def pipeline_tags() -> dict[str, str]:
    """Where this pipeline run came from: a ``dvc exp run`` experiment, a Prefect flow run (with its UI link)."""
    tags = {}
    if os.environ.get("DVC_EXP_NAME"):  # set by `dvc exp run` for every stage command
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        if os.environ.get("DVC_EXP_BASELINE_REV"):
            tags["dvc_exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    if "prefect" in sys.modules:  # never import Prefect into a plain `dvc repro` stage (slow)
        from prefect.context import FlowRunContext
        from prefect.runtime import flow_run
        from prefect.utilities.urls import url_for

        flow_run_id = flow_run.get_id()  # from the flow or task context, or PREFECT__FLOW_RUN_ID: no API call
        if flow_run_id:
            tags["prefect_flow_run_id"] = str(flow_run_id)
            ctx = FlowRunContext.get()
            if ctx is not None and ctx.flow_run is not None:
                tags["prefect_flow_run_name"] = ctx.flow_run.name
                if ctx.flow_run.deployment_id:  # run by a deployment (prefect deployment run, a schedule)
                    tags["prefect_deployment_id"] = str(ctx.flow_run.deployment_id)
            # a link into the Prefect UI, only when a server is configured (PREFECT_UI_URL / PREFECT_API_URL)
            url = url_for("flow-run", obj_id=flow_run_id)
            if url:
                tags["prefect_flow_run_url"] = url
    return tags


def ensure_store(params: Params) -> None:
    """Create the SQLite schema once, before any fan-out (parallel schema creation can race)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params))
    mlflow.MlflowClient().search_experiments(max_results=1)


# The MLflow 3 UI reads this experiment tag to open an experiment on its training runs table
# instead of the GenAI overview (traces); the UI's own "machine learning" switch writes the same value.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(params: Params, task_name: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params))
    client = mlflow.MlflowClient()
    name = params.tracking.experiment_prefix + task_name
    exp = client.get_experiment_by_name(name)
    if exp is None:
        # against a tracking server (http://...) the server decides, and proxies the uploads (--serve-artifacts):
        # a local folder here would be this machine's only, invisible to the server and to teammates
        remote = tracking_uri(params).startswith(("http://", "https://"))
        location = None if remote else (artifact_root(params) / name).as_uri()
        try:
            return client.create_experiment(
                name, artifact_location=location, tags={"cv_task": task_name, EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1]}
            )
        except Exception:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
    if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # an experiment made before the tag existed
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def log_params_once(client, run_id: str, values: dict) -> None:
    """Log params a run does not hold yet; a different value for a held key is reported, not fatal
    (an explicit ``CV_PIPELINE_RUN_ID`` may group runs whose settings differ)."""
    from mlflow.entities import Param

    held = client.get_run(run_id).data.params
    new = [Param(k, str(v)[:6000]) for k, v in values.items() if k not in held]
    clash = sorted(k for k, v in values.items() if k in held and held[k] != str(v)[:6000])
    if clash:
        print(
            f"[mlflow] pipeline run {run_id} already holds other values for {', '.join(clash[:5])}"
            f"{' ...' if len(clash) > 5 else ''}: kept the first ones",
            file=sys.stderr,
        )
    for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=new[i : i + 100])


def parent_run(params: Params, task_name: str, pipeline_run_id: str, settings: dict | None = None) -> str:
    """The run that groups one pipeline run's stages in the MLflow UI (found or created): one row of the
    runs table, carrying the task's effective settings as params (``settings``), so that Compare on two
    parents shows what changed. It stays RUNNING while a stage runs (see :func:`stage_run`)."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = experiment_id(params, task_name)
    found = client.search_runs(
        [exp], filter_string=f"tags.pipeline_run_id = '{pipeline_run_id}' and tags.kind = 'pipeline'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
    else:
        context = pipeline_tags()
        name = context.get("dvc_exp_name") or context.get("prefect_flow_run_name") or f"pipeline {pipeline_run_id}"
        run_id = client.create_run(
            exp,
            run_name=name,
            tags={
                "pipeline_run_id": pipeline_run_id,
                "kind": "pipeline",
                "cv_task": task_name,
                "git_commit": git_commit(),
                **context,
            },
        ).info.run_id
    if settings:
        log_params_once(client, run_id, settings)
    return run_id


def set_parent_status(run_id: str, status: str) -> None:
    """RUNNING while a stage runs; FINISHED / FAILED with the end time of the last stage, so the
    parent spans the whole pipeline even when each stage is its own process (``dvc repro``)."""
    import mlflow

    from tasks.training import runstate

    client = mlflow.MlflowClient()
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
        for (
            k,
            v,
        ) in runstate.owner_tags().items():  # a kill -9 leaves it RUNNING: the next stage closes it (close_stale_runs)
            client.set_tag(run_id, k, v)
    else:
        client.set_terminated(run_id, status=status)


def close_stale_runs(params: Params) -> list[str]:
    """Runs left RUNNING by a killed stage (``kill -9``, out of memory) end FAILED with a note."""
    import mlflow

    from tasks.training import runstate

    mlflow.set_tracking_uri(tracking_uri(params))
    stale = runstate.mark_stale_runs(mlflow.MlflowClient())
    for run_id in stale:
        print(f"[mlflow] run {run_id} was left RUNNING by a process that no longer exists: marked FAILED")
    return stale


def run_data_version(task_name: str, cfg: TaskConfig) -> dict[str, str]:
    """The validate stage's digest of every file (works for data outside DVC), and DVC's hash where known."""
    from tasks.track.data_version import read_data_version

    dvc_hash = data_version(cfg.data.path)
    digest = read_data_version(task_name)["digest"]
    return {"data_version": digest if digest != "unknown" else dvc_hash, "dvc_data_version": dvc_hash}


@contextmanager
def stage_run(
    params: Params,
    task_name: str,
    stage: str,
    cfg: TaskConfig | None,
    seeds: dict,
    pipeline_run_id: str | None,
    extra_params: dict | None = None,
) -> Iterator[str]:
    """An active MLflow run for one stage, nested under the pipeline run. Yields the run id.

    The run ends FAILED if the stage raises and KILLED if it is interrupted (SIGTERM, SIGINT), so the store never
    holds a half-finished "running" stage; runs of killed processes are closed by the next stage (close_stale_runs).
    """
    import mlflow

    from tasks.training import runstate

    pipeline_run_id = pipeline_run_id or resolve_pipeline_run_id(None)
    mlflow.set_tracking_uri(tracking_uri(params))
    close_stale_runs(params)
    logged = {**seeds, **(extra_params or {})}
    if cfg is not None:
        logged.update(flatten(cfg.model_dump(mode="json")))
    parent = parent_run(params, task_name, pipeline_run_id, settings=logged)
    set_parent_status(parent, "RUNNING")
    tags = {
        "mlflow.parentRunId": parent,
        "pipeline_run_id": pipeline_run_id,
        "kind": "stage",
        "stage": stage,
        "cv_task": task_name,
        "git_commit": git_commit(),
        **runstate.owner_tags(),
    }
    if cfg is not None:
        tags.update(run_data_version(task_name, cfg))
    run = mlflow.start_run(experiment_id=experiment_id(params, task_name), run_name=stage, tags=tags)
    try:
        mlflow.log_params({k: str(v)[:6000] for k, v in logged.items()})
        yield run.info.run_id
    except KeyboardInterrupt:  # SIGINT, or SIGTERM turned into runstate.StageInterrupted
        mlflow.end_run("KILLED")
        set_parent_status(parent, "KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        set_parent_status(parent, "FAILED")
        raise
    mlflow.end_run("FINISHED")
    set_parent_status(parent, "FINISHED")
