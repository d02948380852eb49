"""Prefect flow ``ablate``: one change at a time over several seeds, for any registered task.

    python -m flows.ablation classification                      # params.yaml's ablation: section
    python -m flows.ablation classification --set ablation.seeds=2 --set tasks.classification.train.epochs=5

Every arm (the baseline included) x seed is an independent Prefect task on the runner of
``ablation.runner`` (threads, processes or a Dask cluster). Results: outputs/<task>/ablation/
(metrics.json, table.csv, table.md, ablation.png), a Prefect table artifact, and an MLflow parent
run ``ablation <task>`` with one child run per arm and seed.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.fanout import FanOut
from tasks.runners import ablation
from tasks.config import load_params
from tasks.runners.experiments import (
    TrainJob,
    child_runs,
    find_or_create_parent,
    log_metrics,
    prepare,
    retry_locked,
    client,
    train_and_score,
)
from tasks.track.tracking import ensure_store

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


@task(name="train-arm", task_run_name="{job.run_name}")
def train_arm(job: TrainJob, result_path: str, meta: dict) -> dict:
    """Train one arm with one seed and keep its result at once (a stopped ablation resumes from these)."""
    result = {**meta, **train_and_score(job), "worker": _where()}
    from tasks.paths import atomic_write_bytes
    import json

    atomic_write_bytes(
        Path(job.project_dir) / result_path, (json.dumps(result, indent=2, default=float) + "\n").encode()
    )
    return result


def _where() -> str:
    """The Dask worker's address when on a Dask cluster, else host:pid (shown in the result files)."""
    if "distributed" in sys.modules:
        try:
            from distributed import get_worker

            return get_worker().address
        except ValueError:  # not inside a Dask worker
            pass
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def publish(task_name: str, df, markdown: str) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = f"{task_name.replace('_', '-')}-ablation"
    rows = [{k: ablation.finite(v) for k, v in row.items()} for row in df.to_dict("records")]
    create_table_artifact(table=rows, key=key, description=f"{task_name}: one change at a time (test metric)")
    create_markdown_artifact(markdown=markdown, key=f"{key}-report", description=f"{task_name}: ablation table")


@flow(
    name="ablate",
    log_prints=True,
    description="Each change of params' ablation.arms applied alone on top of the baseline, over several seeds",
)
def ablate(
    task_name: str = "classification", params_path: str = "params.yaml", overrides: dict[str, Any] | None = None
) -> dict:
    started = time.perf_counter()
    ablation.plan(task_name, params_path, overrides, build_models=False)  # bad settings stop here, before anything runs
    prepare(task_name, params_path, overrides)  # the data and its normalisation statistics, when missing
    p = ablation.plan(task_name, params_path, overrides)  # and every arm's model builds, before training
    params = load_params(params_path, overrides)
    ensure_store(params)  # the MLflow schema exists before the workers write to it
    arm_names = [a.name for a in p.arms[:: p.config.seeds]]
    exp, parent = find_or_create_parent(
        params, task_name, "ablation", p.key, f"ablation {task_name}", {"primary_metric": p.primary_metric}
    )
    tag_parent(params, parent, p, arm_names)
    runs_by_key = ablation.finished_runs(p, child_runs(params, exp, parent))
    results = [ablation.finished(p, arm, runs_by_key) for arm in p.arms]
    todo = [i for i, r in enumerate(results) if r is None]
    print(
        f"[ablate] {task_name}: {len(arm_names)} arms {arm_names} x {p.config.seeds} seeds; "
        f"{len(p.arms) - len(todo)} runs already finished, {len(todo)} to train on {p.config.runner.kind} "
        f"(max_workers={p.config.runner.max_workers})"
    )
    train_todo(p, todo, results, exp, parent)
    seconds = time.perf_counter() - started
    df, metrics, markdown = ablation.summarise(p, results, seconds)
    log_results(params, parent, p, df, seconds)
    publish(task_name, df, markdown)
    print(markdown)
    return metrics


def tag_parent(params, parent: str, p: ablation.Plan, arm_names: list[str]) -> None:
    """The arms (a tag: they may change on resume) and each arm's settings that differ from the baseline."""
    retry_locked(client(params).set_tag, parent, "arms", ",".join(arm_names))
    for name, diff in (p.diffs or {}).items():
        if name != ablation.BASELINE:
            retry_locked(client(params).set_tag, parent, f"diff_vs_baseline.{name}", ablation.diff_text(diff)[:5000])


def train_todo(p: ablation.Plan, todo: list[int], results: list, exp: str, parent: str) -> None:
    """The runs of ``todo`` (indices of ``p.arms``) trained on the runner, their results into ``results``; when
    any failed, a RuntimeError naming each (the finished ones are kept)."""
    calls = []
    for i in todo:
        arm = p.arms[i]
        calls.append(
            {
                "job": ablation.job(p, arm, exp, parent),
                "result_path": str(p.result_path(arm)),
                "meta": {"arm": arm.name, "seed": arm.seed, "arm_key": arm.key, "changes": arm.changes},
            }
        )
    with FanOut(p.config.runner) as fan:
        outcomes = fan.map(train_arm, calls)
    failed = []
    for i, out in zip(todo, outcomes):
        if isinstance(out, BaseException):
            failed.append(f"{p.arms[i].label}: {type(out).__name__}: {out}")
        else:
            results[i] = out
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(todo)} ablation runs failed (the finished ones are kept; "
            "run again to resume):\n  " + "\n  ".join(failed)
        )


def log_results(params, parent: str, p: ablation.Plan, df, seconds: float) -> None:
    """Each change's mean, difference and spread and the files to the parent MLflow run, which then ends FINISHED."""
    row_metrics = {}
    for r in df.itertuples(index=False):
        row_metrics.update({f"mean.{r.change}": r.mean, f"diff.{r.change}": r.diff})
        if not math.isnan(r.std):
            row_metrics[f"std.{r.change}"] = r.std
    log_metrics(params, parent, row_metrics | {"wall_seconds": seconds})
    c = client(params)
    for name in ("metrics.json", "table.csv", "table.md", "ablation.png"):
        retry_locked(c.log_artifact, parent, str(p.out_dir / name), "ablation")
    retry_locked(c.set_terminated, parent, "FINISHED")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from tasks.cli import parse_overrides
    from tasks.config import ConfigError

    parser = argparse.ArgumentParser(
        prog="python -m flows.ablation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", help="CV task name (a key of tasks: in params.yaml)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        ablate(task_name=args.task, params_path=args.params, overrides=parse_overrides(args.overrides) or None)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
