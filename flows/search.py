"""Prefect flow ``search``: Optuna hyperparameter search for any registered task.

    python -m flows.search classification                    # params.yaml's search: section
    python -m flows.search classification --set search.trials=30
    dvc exp run $(python -m flows.search classification --dvc-args)   # train with the best values

Trials run in waves of ``search.runner.max_workers`` on the chosen runner (threads, processes or a
Dask cluster); each is a Prefect task and an MLflow child run of the parent ``search <task>``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from prefect import flow, task

from flows.fanout import FanOut
from tasks.config import load_params
from tasks.runners import search as search_stage
from tasks.runners.experiments import TrainJob, client, find_or_create_parent, log_metrics, prepare, retry_locked
from tasks.track.tracking import ensure_store

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


@task(name="trial", task_run_name="{job.run_name}")
def trial_task(job: TrainJob, storage: str, study_name: str, trial_id: int, primary: str, pruner: dict) -> dict:
    return search_stage.run_trial(job, storage, study_name, trial_id, primary, pruner)


def publish(task_name: str, study, primary: str) -> None:
    from prefect.artifacts import create_table_artifact

    rows = [
        {
            "trial": t.number,
            "state": t.state.name,
            f"val_{primary}": search_stage.clean(t.value),
            "epochs": len(t.intermediate_values),
            **t.params,
        }
        for t in study.trials
    ]
    create_table_artifact(
        table=rows,
        key=f"{task_name.replace('_', '-')}-search",
        description=f"{task_name}: Optuna trials (objective: best val {primary})",
    )


@flow(
    name="search",
    log_prints=True,
    description="Optuna search over params' search.space, pruning from per-epoch val metrics",
)
def search(
    task_name: str = "classification", params_path: str = "params.yaml", overrides: dict[str, Any] | None = None
) -> dict:
    started = time.perf_counter()
    search_stage.plan(
        task_name, params_path, overrides, build_model=False
    )  # bad ranges stop here, before anything runs
    prepare(task_name, params_path, overrides)  # the data and its normalisation statistics, when missing
    p = search_stage.plan(task_name, params_path, overrides)  # and the model builds
    params = load_params(params_path, overrides)
    ensure_store(params)
    study = search_stage.open_study(p)
    stale = search_stage.recover(study, p)
    exp, parent = find_or_create_parent(
        params, task_name, "search", p.study_name, f"search {task_name}", {"study": p.study_name, "storage": p.storage}
    )
    done = search_stage.finished_count(study)
    print(
        f"[search] {task_name}: study {p.study_name} holds {done} finished trials"
        + (f" ({stale} interrupted trials queued again)" if stale else "")
        + f"; running {max(p.config.trials - done, 0)} more on {p.config.runner.kind} (max_workers={p.config.runner.max_workers})"
    )
    run_waves(study, p, exp, parent, done)
    summary = search_stage.summarise(p, study)
    log_summary(params, parent, p, summary, time.perf_counter() - started)
    publish(task_name, study, p.primary_metric)
    print(
        f"[search] best trial {summary['best_trial']}: val {p.primary_metric} = "
        f"{summary[f'best_val_{p.primary_metric}']:.4f} with {summary['params']} -> {p.out_dir / 'best_params.yaml'}"
    )
    return summary


def run_waves(study, p: search_stage.SearchPlan, exp: str, parent: str, done: int) -> None:
    """The trials still to run, in waves as wide as the runner (trials of one wave cannot prune against each
    other), each told to the study as it ends: complete, pruned or failed."""
    from optuna.trial import TrialState

    distributions = p.distributions()
    width = 1 if p.config.runner.kind == "sequential" else p.config.runner.max_workers
    with FanOut(p.config.runner) as fan:
        while done < p.config.trials:
            wave = [study.ask(distributions) for _ in range(min(width, p.config.trials - done))]
            calls = [
                {
                    "job": search_stage.job(p, t.number, t.params, exp, parent),
                    "storage": p.storage,
                    "study_name": p.study_name,
                    "trial_id": t._trial_id,
                    "primary": p.primary_metric,
                    "pruner": p.config.pruner.model_dump(),
                }
                for t in wave
            ]
            for t, out in zip(wave, fan.map(trial_task, calls)):
                if isinstance(out, BaseException):
                    print(f"[search] trial {t.number} {t.params} failed: {type(out).__name__}: {out}")
                    study.tell(t, state=TrialState.FAIL)
                elif out["pruned"]:
                    print(f"[search] trial {t.number} {t.params}: {out['reason']}")
                    study.tell(t, state=TrialState.PRUNED)
                else:
                    print(f"[search] trial {t.number} {t.params}: val {p.primary_metric} = {out['value']:.4f}")
                    study.tell(t, out["value"])
            done += len(wave)


def log_summary(params, parent: str, p: search_stage.SearchPlan, summary: dict, seconds: float) -> None:
    """The study's figures, best trial and files to the parent MLflow run, which then ends FINISHED."""
    log_metrics(
        params,
        parent,
        {
            f"best_val_{p.primary_metric}": summary[f"best_val_{p.primary_metric}"],
            "complete": summary["complete"],
            "pruned": summary["pruned"],
            "failed": summary["failed"],
            "wall_seconds": seconds,
        },
    )
    c = client(params)
    retry_locked(c.set_tag, parent, "best_trial", str(summary["best_trial"]))
    for name in ("best_params.yaml", "best.json", "trials.csv"):
        retry_locked(c.log_artifact, parent, str(p.out_dir / name), "search")
    retry_locked(c.set_terminated, parent, "FINISHED")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from tasks.cli import parse_overrides
    from tasks.config import ConfigError

    parser = argparse.ArgumentParser(
        prog="python -m flows.search", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", help="CV task name (a key of tasks: in params.yaml)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--dvc-args",
        action="store_true",
        help="print the best values as `-S key=value` arguments of `dvc exp run` and exit",
    )
    args = parser.parse_args(argv)
    try:
        if args.dvc_args:
            print(search_stage.dvc_args(args.task))
            return 0
        search(task_name=args.task, params_path=args.params, overrides=parse_overrides(args.overrides) or None)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
