"""The Prefect side of the pipeline.

Each stage of the chain (:mod:`tasks.chain`, the one definition dvc.yaml also follows) becomes a Prefect
task; ``train-<task>`` flows run them in order: generate (when the embedded data is used) -> pretrain
(when the task starts from its checkpoint) -> validate -> normstats -> baseline -> augmented -> evaluate.
The flows call exactly the functions that ``dvc repro`` calls through the CLI, so both give the
same metrics for the same params. Flow parameters override params.yaml and are logged to MLflow.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, task
from prefect.runtime import flow_run

from cv_models import TASKS
from tasks.chain import CHAIN, run_stage, stages_for
from tasks.config import load_params
from tasks.track.tracking import ensure_store

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

# one Prefect task per stage of the chain (named as the stage; the data generation as before)
STAGE_TASKS = {
    name: task(run_stage, name="generate-data" if name == "generate" else name, task_run_name=name) for name in CHAIN
}


def flow_name(task_name: str) -> str:
    return "train-" + task_name.replace("_", "-")


def collect_overrides(
    task_name: str, epochs: int | None, batch_size: int | None, seed: int | None, overrides: dict[str, Any] | None
) -> dict[str, Any]:
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
    result = None
    for name in stages_for(params, task_name):  # the chain, with generate / pretrain where the task needs them
        result = STAGE_TASKS[name](name, task_name, params_path, overrides, pipeline_run_id=run_id)
    return result  # evaluate's metrics


def make_flow(task_name: str):
    def train(
        epochs: int | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        overrides: dict[str, Any] | None = None,
        params_path: str = "params.yaml",
    ) -> dict:
        return run_pipeline(task_name, params_path, collect_overrides(task_name, epochs, batch_size, seed, overrides))

    # a served deployment loads the flow by its entrypoint ``flows.pipeline.train_<task>``: the
    # function must carry that name (set before decorating) and exist at module level (below)
    train.__name__ = train.__qualname__ = f"train_{task_name}"
    train.__module__ = __name__
    return flow(
        name=flow_name(task_name),
        description=f"{' -> '.join(CHAIN)} for {task_name} (generate and pretrain when used)",
        log_prints=True,
    )(train)


FLOWS = {name: make_flow(name) for name in TASKS}
globals().update({f"train_{name}": f for name, f in FLOWS.items()})
train_classification = FLOWS["classification"]

if __name__ == "__main__":
    import sys

    name = sys.argv[1] if len(sys.argv) > 1 else "classification"
    print(FLOWS[name]())
