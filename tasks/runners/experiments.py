"""What the ablation and the hyperparameter search share.

* ``RunnerConfig``: where independent trainings run (in turn, threads, processes or a Dask cluster).
* ``TrainJob`` / :func:`train_and_score`: one training of a changed task config, reusing
  :func:`tasks.training.train.train_model` (and so :func:`tasks.training.engine.fit`): train split to fit, validation
  split to pick the best epoch, and optionally the test split for the final figure.
* MLflow bookkeeping through explicit run ids (``MlflowClient``), never the fluent active run, which is
  thread-local and so invisible to task-runner threads, processes and Dask workers; every write is
  retried while SQLite reports "database is locked".
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from tasks.config import Params, config_hash, flatten, load_params
from tasks.runners.experiment_settings import RunnerConfig

# settings that change how fast a run goes, not what it learns: left out of the resume keys
NOT_LEARNING = (
    "train.num_threads",
    "train.num_workers",
    "train.resume",
    "train.device",
    "train.eval_batch_size",
    "data.cache",
    "data.cache_max_gb",
)


def task_keys(task_name: str, dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"augment.hflip.enabled": True}`` -> ``{"tasks.<task>.augment.hflip.enabled": True}``."""
    return {f"tasks.{task_name}.{k}": v for k, v in dotted.items()}


def learning_hash(task_cfg_dump: dict, seed: int) -> str:
    """Key of a training's outcome: the task settings that change what is learnt, and the seed."""
    flat = {k: v for k, v in flatten(task_cfg_dump).items() if k not in NOT_LEARNING}
    return config_hash({"cfg": flat, "seed": seed})


def worker_threads(runner: RunnerConfig) -> int:
    """Torch threads per concurrent training so that the workers share the cores instead of fighting."""
    if runner.kind == "sequential" or (runner.kind == "dask" and runner.dask_address):
        return 0  # one at a time here / the remote workers' own cores
    return max(1, (os.cpu_count() or 1) // runner.max_workers)


# ---------------------------------------------------------------- MLflow with explicit run ids


# another worker's write got there first: the store is locked, or MLflow's check-then-insert of a logged dataset
# (log_inputs: one row per experiment, name and digest) raced with the same insert, which a retry then finds
RETRYABLE = ("locked", "unique constraint failed: datasets.")


def retry_locked(fn: Callable, *args, attempts: int = 10, **kwargs):
    """Call ``fn``; while another worker's write is in the way (:data:`RETRYABLE`), wait and retry."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - mlflow wraps sqlite3 errors in its own types
            if not any(m in str(err).lower() for m in RETRYABLE) or attempt == attempts - 1:
                raise
            time.sleep(min(0.1 * 2**attempt, 3.0) * (0.5 + random.random()))


def client(params: Params):
    import mlflow

    from tasks.track.tracking import tracking_uri

    return mlflow.MlflowClient(tracking_uri(params))


def create_child_run(params: Params, experiment_id: str, parent_id: str, name: str, tags: dict[str, str]) -> str:
    from tasks.track.tracking import git_commit

    all_tags = {"mlflow.parentRunId": parent_id, "git_commit": git_commit(), **tags}
    run = retry_locked(client(params).create_run, experiment_id, run_name=name, tags=all_tags)
    return run.info.run_id


def find_or_create_parent(
    params: Params, task_name: str, kind: str, key: str, name: str, tags: dict[str, str]
) -> tuple[str, str]:
    """The parent run grouping one ablation or one search (found by its key, so a resumed run reuses it)."""
    from tasks.track import tracking

    c = client(params)
    exp = retry_locked(tracking.experiment_id, params, task_name)
    found = retry_locked(
        c.search_runs, [exp], filter_string=f"tags.kind = '{kind}' and tags.{kind}_key = '{key}'", max_results=1
    )
    if found:
        return exp, found[0].info.run_id
    run = retry_locked(
        c.create_run,
        exp,
        run_name=name,
        tags={"kind": kind, f"{kind}_key": key, "cv_task": task_name, "git_commit": tracking.git_commit(), **tags},
    )
    return exp, run.info.run_id


def log_metrics(params: Params, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    clean = [
        Metric(k.replace("/", "."), float(v), now, step or 0)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    if clean:
        retry_locked(client(params).log_batch, run_id, metrics=clean)


def log_params(params: Params, run_id: str, values: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in values.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        retry_locked(client(params).log_batch, run_id, params=items[i : i + 100])


# ---------------------------------------------------------------- one training


@dataclass
class TrainJob:
    """Everything a worker (thread, process or Dask worker) needs: plain data, picklable."""

    task_name: str
    params_path: str  # absolute
    overrides: dict[str, Any]  # full dotted keys, the seed included
    stage_name: str  # models/<task>/<stage_name>/, checkpoints/<task>/<stage_name>/
    out_dir: str  # history.csv / history.png of this training
    project_dir: str  # the folder the relative paths of params.yaml start from
    experiment_id: str
    parent_run_id: str
    run_name: str
    tags: dict[str, str] = field(default_factory=dict)
    score_test: bool = True
    keep_model: bool = False


def enter_project(project_dir: str) -> None:
    """Worker processes (a Dask cluster, a process pool) must resolve the project's relative paths."""
    if Path.cwd().resolve() != Path(project_dir).resolve():
        os.chdir(project_dir)


def train_and_score(job: TrainJob, on_epoch: Callable[[dict, int], None] | None = None) -> dict[str, Any]:
    """Train the job's config (best epoch on val), score it on test; one MLflow child run. Returns the metrics.

    ``on_epoch(metrics, epoch)`` sees every epoch's validation metrics (the search prunes from there).
    """
    from tasks.training.seeding import seed_everything
    from tasks.training.train import train_model
    from cv_models import get_task

    enter_project(job.project_dir)
    params = load_params(job.params_path, job.overrides)
    cfg = params.task(job.task_name)
    run_id = create_child_run(
        params, job.experiment_id, job.parent_run_id, job.run_name, {"cv_task": job.task_name, **job.tags}
    )
    status = "FAILED"
    try:
        seeds = seed_everything(params.seed)
        task = get_task(job.task_name, cfg)
        log_params(params, run_id, {**seeds, **flatten(cfg.model_dump(mode="json"))})
        st = tracked_stage_type(on_epoch)(params, job.stage_name, job.task_name, cfg, task, seeds, run_id)
        out_dir = Path(job.out_dir)
        result, model_path = train_model(st, cfg.augment, out_dir)
        primary = task.primary_metric
        metrics: dict[str, Any] = {
            f"best_val_{primary}": result.best_metrics[primary],
            "best_epoch": result.best_epoch,
            "train_seconds": round(result.seconds, 2),
        }
        if job.score_test:
            metrics.update(score_test(st, model_path))
        log_metrics(params, run_id, metrics)
        tidy_up(st, job, out_dir, model_path)
        status = "FINISHED"
        return {**metrics, "run_id": run_id}
    except BaseException as err:
        if type(err).__name__ == "TrialPruned":
            status = "KILLED"  # stopped early on purpose: the search's pruner
        raise
    finally:
        retry_locked(client(params).set_terminated, run_id, status)


def tracked_stage_type(on_epoch: Callable[[dict, int], None] | None) -> type:
    """A Stage whose MLflow calls name their run (thread-safe) and whose epochs reach ``on_epoch``."""
    from tasks.stage import Stage

    @dataclass
    class TrackedStage(Stage):
        def log_metrics(self, metrics, step=None, prefix=""):
            log_metrics(self.params, self.run_id, {prefix + k: v for k, v in metrics.items()}, step)
            if step is not None and on_epoch is not None:
                on_epoch(metrics, step)

        def log_params(self, values):
            log_params(self.params, self.run_id, values)

        def log_artifacts(self, path, artifact_path=None):
            if artifact_path == "model":  # one model per arm and seed: kept on disk only if asked
                return
            retry_locked(client(self.params).log_artifact, self.run_id, str(path), artifact_path)

        def log_model(self, model_path, metrics):  # as above: no logged model per arm and seed
            return

        def log_inputs(self, *splits):  # the other arms write to the same SQLite store
            retry_locked(Stage.log_inputs, self, *splits)

    return TrackedStage


def score_test(st, model_path: Path) -> dict[str, Any]:
    """The trained model's ``test_*`` metrics, at each image's own size, as the evaluate stage scores."""
    from tasks.training import engine
    from tasks.training.train import normalizer

    task, cfg = st.task, st.cfg
    norm = normalizer(st)
    test = task.dataset("test", task.eval_transforms(norm))
    device = engine.pick_device(cfg.train.device)
    loader = engine.make_loader(
        task, test, cfg.train.eval_batch_size, False, st.params.seed, engine.worker_count(cfg.train)
    )
    model = engine.load_model(task, model_path).to(device)
    scored = task.evaluate(model, loader, device, native=True)
    return {f"test_{k}": v for k, v in scored.metrics.items()}


def tidy_up(st, job: TrainJob, out_dir: Path, model_path: Path) -> None:
    """The history to MLflow; the model (unless kept) and the emptied checkpoint folders off the disk."""
    from tasks.paths import checkpoints

    for name in ("history.csv", "history.png"):
        if (out_dir / name).exists():
            st.log_artifacts(out_dir / name)
    if not job.keep_model:
        shutil.rmtree(model_path.parent, ignore_errors=True)
        remove_empty_parents(model_path.parent, Path("models"))
    remove_empty_parents(checkpoints(job.task_name, job.stage_name), Path("checkpoints"))


def remove_empty_parents(folder: Path, stop: Path) -> None:
    """Remove ``folder`` and its parents while they are empty, up to (not including) ``stop``."""
    folder, stop = Path(folder).resolve(), Path(stop).resolve()
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (another arm's files) or already gone
            if folder.exists():
                return
        folder = folder.parent


def child_runs(params: Params, experiment_id: str, parent_id: str) -> list:
    """All child runs of a parent (any status), newest first."""
    c = client(params)
    out, token = [], None
    while True:
        page = retry_locked(
            c.search_runs,
            [experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
            max_results=1000,
            page_token=token,
            order_by=["attributes.start_time DESC"],
        )
        out += list(page)
        token = page.token
        if not token:
            return out


def prepare(task_name: str, params_path: str, overrides: dict[str, Any] | None) -> None:
    """What every training needs first (the chain's stages before ``baseline``: data, checks, normalisation
    statistics, the pretrained checkpoint when the task uses it); run when the statistics are missing."""
    from tasks.chain import BEFORE_TRAINING, run_stage, stages_for
    from tasks.paths import outputs

    if (outputs(task_name, "normstats") / "stats.json").exists():
        return
    params = load_params(params_path, overrides)
    for name in stages_for(params, task_name, BEFORE_TRAINING):
        if name == "generate" and Path(params.task(task_name).data.path).exists():
            continue  # the data is there already
        if name == "pretrain" and Path(params.pretrain.out).exists():
            continue
        run_stage(name, task_name, params_path, overrides)
