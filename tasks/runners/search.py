"""Hyperparameter search with Optuna over ``search.space`` of params.yaml (dotted keys relative to
``tasks.<task>``: learning rate, weight decay, batch size, schedule, augmentation strengths, ...).

Each trial trains the task's augmented configuration with the sampled values through
:func:`tasks.runners.experiments.train_and_score` (so :func:`tasks.training.engine.fit`), reports the validation
metric every epoch to Optuna and is pruned when the pruner says so. The objective is the best
validation primary metric; the test split is never looked at. The study lives in Optuna's RDB
storage (``search.storage``, a SQLite file in the project, git-ignored): running the search again
continues the same study up to ``search.trials``. The best values are written as
``outputs/<task>/search/best_params.yaml`` (params.yaml's shape) and ``best.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import ConfigError, config_hash, load_params
from tasks.runners.experiment_settings import PrunerConfig, SearchConfig
from tasks.runners.experiments import TrainJob, learning_hash, task_keys, worker_threads
from tasks.paths import checkpoints, outputs


@dataclass
class SearchPlan:
    task_name: str
    primary_metric: str
    config: SearchConfig
    base: dict[str, Any]  # dotted overrides relative to tasks.<task> shared by every trial
    overrides: dict[str, Any]
    params_path: str
    study_name: str
    storage: str
    seed: int

    @property
    def out_dir(self) -> Path:
        return outputs(self.task_name, "search")

    def distributions(self) -> dict:
        return {k: v.distribution() for k, v in self.config.space.items()}

    def trial_overrides(self, values: dict[str, Any]) -> dict[str, Any]:
        return {**self.overrides, **task_keys(self.task_name, {**self.base, **values})}


def storage_url(url: str) -> str:
    """A relative ``sqlite:///file.db`` made absolute, so worker processes find the same file."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url[len(prefix) :].startswith("/"):
        return prefix + str(Path(url[len(prefix) :]).resolve())
    return url


def plan(
    task_name: str,
    params_path: str | Path = "params.yaml",
    overrides: dict[str, Any] | None = None,
    build_model: bool = True,
) -> SearchPlan:
    """Check everything before the first trial: the ranges, that every end of every range is a valid setting."""
    from cv_models import get_task

    overrides = dict(overrides or {})
    params = load_params(params_path, overrides)
    base_cfg = params.task(task_name)
    cfg = params.search
    base: dict[str, Any] = {}
    threads = worker_threads(cfg.runner)
    if threads and base_cfg.train.num_threads == 0:
        base["train.num_threads"] = threads
    for key, dim in cfg.space.items():
        for value in dim.corners():
            try:
                load_params(params_path, {**overrides, **task_keys(task_name, {**base, key: value})}).task(task_name)
            except ConfigError as err:
                raise ConfigError(
                    f"search.space.{key}: the value {value!r} is not a valid setting of tasks.{task_name}.{key}:\n{err}"
                ) from None
    task = get_task(task_name, base_cfg)
    if build_model:  # unknown model or missing weights: fail before the first trial (needs the data's classes)
        task.build_model()
    space = {k: v.model_dump(mode="json") for k, v in cfg.space.items()}
    name = (
        cfg.study_name
        or f"{task_name}-{config_hash({'base': learning_hash(base_cfg.model_dump(mode='json'), params.seed), 'space': space, 'pruner': cfg.pruner.model_dump()})}"
    )
    seed = params.seed if cfg.sampler_seed is None else cfg.sampler_seed
    return SearchPlan(
        task_name,
        task.primary_metric,
        cfg,
        base,
        overrides,
        str(Path(params_path).resolve()),
        name,
        storage_url(cfg.storage),
        seed,
    )


def open_study(p: SearchPlan):
    import optuna

    sampler = optuna.samplers.TPESampler(seed=p.seed)
    return optuna.create_study(
        study_name=p.study_name,
        storage=p.storage,
        direction="maximize",
        sampler=sampler,
        pruner=p.config.pruner.build(),
        load_if_exists=True,
    )


def recover(study, p: SearchPlan) -> int:
    """A search stopped half way left trials RUNNING: mark them failed and queue their values again
    (their last epoch checkpoint, keyed by the values, lets them continue). Returns how many."""
    import optuna
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        optuna.Trial(study, t._trial_id).set_user_attr("interrupted", True)
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, skip_if_exists=False)
    if not study.trials or all(t.user_attrs.get("interrupted") for t in study.trials):
        for values in p.config.enqueue:
            study.enqueue_trial(values, skip_if_exists=True)
    return len(stale)


def finished_count(study) -> int:
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=done) if not t.user_attrs.get("interrupted"))


def trial_key(p: SearchPlan, values: dict[str, Any]) -> str:
    return config_hash({"study": p.study_name, "values": values})


def job(p: SearchPlan, number: int, values: dict[str, Any], experiment_id: str, parent_run_id: str) -> TrainJob:
    key = trial_key(p, values)
    return TrainJob(
        task_name=p.task_name,
        params_path=p.params_path,
        overrides={**p.trial_overrides(values), "seed": p.seed},
        stage_name=f"search/{key}",
        out_dir=str(Path.cwd() / checkpoints(p.task_name, "search") / key / "files"),
        project_dir=str(Path.cwd()),
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        run_name=f"trial {number}",
        score_test=False,
        tags={"kind": "search-trial", "trial": str(number), "study": p.study_name, "trial_key": key},
    )


def run_trial(j: TrainJob, storage: str, study_name: str, trial_id: int, primary: str, pruner: dict) -> dict[str, Any]:
    """One trial in a worker: per-epoch validation metric to Optuna, pruned when the pruner says so."""
    import shutil

    import optuna

    from tasks.runners.experiments import enter_project, train_and_score

    enter_project(j.project_dir)
    study = optuna.load_study(study_name=study_name, storage=storage, pruner=PrunerConfig(**pruner).build())
    trial = optuna.Trial(study, trial_id)

    def on_epoch(metrics: dict, epoch: int) -> None:
        if f"val_{primary}" not in metrics:  # an epoch without validation (train.val_every): nothing to judge
            return
        trial.report(float(metrics[f"val_{primary}"]), epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")

    scratch = Path(j.out_dir).parent
    try:
        metrics = train_and_score(j, on_epoch=on_epoch)
    except optuna.TrialPruned as err:
        shutil.rmtree(scratch, ignore_errors=True)  # nothing to resume
        return {"pruned": True, "reason": str(err)}
    shutil.rmtree(scratch, ignore_errors=True)
    return {"pruned": False, "value": metrics[f"best_val_{primary}"], **metrics}


def summarise(p: SearchPlan, study) -> dict[str, Any]:
    """best_params.yaml, best.json (DVC metrics) and trials.csv (DVC plots) from the study."""
    import yaml
    from optuna.trial import TrialState

    out = p.out_dir
    out.mkdir(parents=True, exist_ok=True)
    trials = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration"))
    if "duration" in trials:
        trials["duration"] = trials["duration"].dt.total_seconds()
    trials.to_csv(out / "trials.csv", index=False)
    states = [t.state for t in study.trials]
    counts = {
        "complete": states.count(TrialState.COMPLETE),
        "pruned": states.count(TrialState.PRUNED),
        "failed": states.count(TrialState.FAIL),
    }
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"study {p.study_name}: no trial completed ({counts}); nothing to write as best parameters")
    best = study.best_trial
    dotted = task_keys(p.task_name, best.params)
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        node = nested
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    header = (
        f"# Best trial {best.number} of Optuna study {p.study_name}: val {p.primary_metric} = {best.value:.4f}\n"
        f"# ({counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed trials).\n"
        f"# Apply to params.yaml as a DVC experiment:  dvc exp run $(python -m flows.search {p.task_name} --dvc-args)\n"
    )
    (out / "best_params.yaml").write_text(header + yaml.safe_dump(nested, sort_keys=False))
    summary = {
        "study": p.study_name,
        "best_trial": best.number,
        f"best_val_{p.primary_metric}": best.value,
        "trials": len(study.trials),
        **counts,
        "params": dotted,
    }
    (out / "best.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def dvc_args(task_name: str) -> str:
    """``-S key=value ...`` for ``dvc exp run``: DVC writes them into params.yaml and reproduces."""
    path = outputs(task_name, "search") / "best.json"
    if not path.exists():
        raise ConfigError(f"{path} does not exist: run the search first (python -m flows.search {task_name})")
    values = json.loads(path.read_text())["params"]
    return " ".join(f"-S {k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items())


def clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value
