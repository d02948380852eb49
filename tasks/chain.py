"""The stage chain, defined once. ``flows/pipeline.py`` (the Prefect flows), ``tasks/runners/experiments.py``
(what a training needs first) and the CLI follow it; ``dvc.yaml`` is written by hand and a test checks that
its stages are these, in this order.

``generate`` and ``pretrain`` run once for every task and only when a task needs them: ``generate`` when a
task reads the embedded synthetic data, ``pretrain`` when a task starts from its checkpoint (``model.weights``
or ``model.options.backbone_weights`` naming ``pretrain.out``). The other stages run per task, in order.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

SHARED = ("generate", "pretrain")  # one run serves every task
# the stages that train a model, each saving models/<task>/<stage>: the plain model first (of two models equally good
# on validation, "best" keeps the plainer), the augmented one last (the headline model)
TRAINED = ("baseline", "augmented")
PER_TASK = ("validate", "normstats", *TRAINED, "evaluate")
CHAIN = SHARED + PER_TASK
BEFORE_TRAINING = CHAIN[: CHAIN.index(TRAINED[0])]  # what a training (ablation arm, search trial) needs first
BY_HAND = ("crops",)  # run once for every task, by hand, outside the chain and dvc.yaml (python -m tasks crops)
ONCE = SHARED + BY_HAND  # the stages without --task


def _inside(path: str | Path, folder: str | Path) -> bool:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def uses_generated_data(params, task_name: str) -> bool:
    return _inside(params.task(task_name).data.path, params.shapes.out_dir)


def uses_pretrain(params, task_name: str) -> bool:
    """The task starts from the pretraining stage's checkpoint (whole model or backbone)."""
    m = params.task(task_name).model
    sources = [m.weights, getattr(m.options, "backbone_weights", "none")]
    return any(
        s not in ("none", None)
        and not str(s).startswith("torchvision:")
        and Path(s).resolve() == Path(params.pretrain.out).resolve()
        for s in sources
    )


def stages_for(params, task_name: str, stages: tuple[str, ...] = CHAIN) -> list[str]:
    """The chain's stages this task runs, in order (``stages``: a part of the chain, e.g. BEFORE_TRAINING)."""
    needed = {
        "generate": uses_generated_data(params, task_name)
        or (uses_pretrain(params, task_name) and _inside(params.pretrain.data, params.shapes.out_dir)),
        "pretrain": uses_pretrain(params, task_name),
    }
    return [s for s in stages if needed.get(s, True)]


def stage_function(name: str):
    """The function that runs a stage (what ``python -m tasks <name>`` calls)."""
    if name not in CHAIN + BY_HAND:
        raise KeyError(f"no stage {name!r}; the chain is {CHAIN}, and {BY_HAND} run by hand")
    return importlib.import_module(f"tasks.{name}").run


def run_stage(
    name: str,
    task_name: str,
    params_path: str | Path,
    overrides: dict[str, Any] | None,
    pipeline_run_id: str | None = None,
) -> Any:
    """Run one stage of the chain for a task (shared stages ignore the task)."""
    fn = stage_function(name)
    if name == "generate":
        return fn(params_path, overrides)
    if name in SHARED:
        return fn(params_path, overrides, pipeline_run_id=pipeline_run_id)
    return fn(task_name, params_path, overrides, pipeline_run_id=pipeline_run_id)
