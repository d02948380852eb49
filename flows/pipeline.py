"""The Prefect side of the pipeline.

Each stage of ``tasks/`` becomes a Prefect task; ``train-<task>`` flows chain them:
generate (when the embedded data is used) -> validate -> normstats -> baseline -> augmented -> evaluate.
The flows call exactly the functions that ``dvc repro`` calls through the CLI, so both give the
same metrics for the same params. Flow parameters override params.yaml and are logged to MLflow.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.runtime import flow_run

from cv_models import TASKS
from tasks import augmented, baseline, evaluate, generate, normstats, validate
from tasks.config import load_params
from tasks.tracking import ensure_store

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

generate_task = task(generate.run, name="generate-data")
validate_task = task(validate.run, name="validate")
normstats_task = task(normstats.run, name="normstats")
baseline_task = task(baseline.run, name="baseline")
augmented_task = task(augmented.run, name="augmented")
evaluate_task = task(evaluate.run, name="evaluate")


def flow_name(task_name: str) -> str:
    return "train-" + task_name.replace("_", "-")


def collect_overrides(task_name: str, epochs: int | None, batch_size: int | None, seed: int | None,
                      overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Shortcut flow parameters as dotted params.yaml keys; ``overrides`` may name any key."""
    out: dict[str, Any] = {}
    if epochs is not None:
        out[f"tasks.{task_name}.train.epochs"] = epochs
    if batch_size is not None:
        out[f"tasks.{task_name}.train.batch_size"] = batch_size
    if seed is not None:
        out["seed"] = seed
    out.update(overrides or {})
    return out


def run_pipeline(task_name: str, params_path: str, overrides: dict[str, Any]) -> dict:
    params = load_params(params_path, overrides)  # bad params stop here, before anything runs
    ensure_store(params)  # create the MLflow schema once
    run_id = f"prefect-{flow_run.get_id() or 'local'}"[:40]
    cfg = params.task(task_name)
    shapes_dir = Path(params.shapes.out_dir).resolve()
    if shapes_dir == Path(cfg.data.path).resolve() or shapes_dir in Path(cfg.data.path).resolve().parents:
        generate_task(params_path, overrides)
    common = dict(task_name=task_name, params_path=params_path, overrides=overrides, pipeline_run_id=run_id)
    validate_task(**common)
    normstats_task(**common)
    baseline_task(**common)
    augmented_task(**common)
    return evaluate_task(**common)


def make_flow(task_name: str):
    def train(epochs: int | None = None, batch_size: int | None = None, seed: int | None = None,
              overrides: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict:
        return run_pipeline(task_name, params_path, collect_overrides(task_name, epochs, batch_size, seed, overrides))

    # a served deployment loads the flow by its entrypoint ``flows.pipeline.train_<task>``: the
    # function must carry that name (set before decorating) and exist at module level (below)
    train.__name__ = train.__qualname__ = f"train_{task_name}"
    train.__module__ = __name__
    return flow(name=flow_name(task_name), description=f"validate -> normstats -> baseline -> augmented -> evaluate for {task_name}",
                log_prints=True)(train)


FLOWS = {name: make_flow(name) for name in TASKS}
globals().update({f"train_{name}": f for name, f in FLOWS.items()})
train_classification = FLOWS["classification"]

if __name__ == "__main__":
    import sys

    name = sys.argv[1] if len(sys.argv) > 1 else "classification"
    print(FLOWS[name]())
