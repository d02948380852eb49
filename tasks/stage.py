"""What every stage does first: read params, seed everything, pick the task, open its MLflow run."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

from cv_models import get_task  # noqa: E402
from tasks.training import accelerate  # noqa: E402
from cv_models.base import CVTask  # noqa: E402
from tasks.training import runstate  # noqa: E402
from tasks.track import tracking  # noqa: E402
from tasks.config import Params, TaskConfig, load_params  # noqa: E402
from tasks.paths import outputs  # noqa: E402
from tasks.training.seeding import seed_everything  # noqa: E402


@dataclass
class Stage:
    params: Params
    name: str  # stage name
    task_name: str
    cfg: TaskConfig
    task: CVTask
    seeds: dict[str, int]
    run_id: str

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, prefix: str = "") -> None:
        if not self.run_id:  # a torchrun rank other than 0: no MLflow run
            return
        import mlflow

        clean = {prefix + k.replace("/", "."): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        mlflow.log_metrics(clean, step=step)

    def log_params(self, values: dict[str, Any]) -> None:
        if not self.run_id:
            return
        import mlflow

        mlflow.log_params({k: str(v)[:6000] for k, v in values.items()})

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.run_id:
            return
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    # what the MLflow UI shows in the runs table (tasks/track/mlflow_view.py); each call names its run
    def _view(self):
        import mlflow

        from tasks.track import mlflow_view

        mlflow.set_tracking_uri(tracking.tracking_uri(self.params))  # worker processes start without it
        return mlflow_view

    def log_inputs(self, *splits: str) -> None:
        """The splits this stage read, on its run and its pipeline run (Dataset column)."""
        if not self.run_id:  # a torchrun rank other than 0: no MLflow run
            return
        mlflow_view = self._view()
        mlflow_view.log_split_inputs(
            [self.run_id, mlflow_view.parent_of(self.run_id)], self.task_name, self.cfg.data.path, splits
        )

    def log_model(self, model_path: Path, metrics: dict[str, float]) -> None:
        """The trained model as an MLflow logged model of this stage and its pipeline run (Model column)."""
        if not self.run_id:  # a torchrun rank other than 0: no MLflow run
            return
        self._view().log_model_file(
            self.run_id,
            f"{self.task_name}-{self.name}",
            model_path,
            {"model.name": self.cfg.model.name, "stage": self.name},
            metrics,
        )

    def log_pictures(self, folder: Path) -> None:
        """The stage's pictures under ``plots/<stage>/`` of the pipeline run."""
        if not self.run_id:  # a torchrun rank other than 0: no MLflow run
            return
        mlflow_view = self._view()
        mlflow_view.log_pictures(mlflow_view.parent_of(self.run_id), folder, self.name)

    def log_pipeline_summary(self, test: dict[str, dict], trained_models: tuple[str, ...]) -> None:
        """The pipeline run's row: ``test`` (metrics per model) plus what the training stages (``trained_models``)
        wrote."""
        if not self.run_id:  # a torchrun rank other than 0: no MLflow run
            return
        mlflow_view = self._view()
        mlflow_view.summarise_pipeline(
            mlflow_view.parent_of(self.run_id),
            self.task_name,
            self.task.primary_metric,
            test,
            lambda stage: outputs(self.task_name, stage),
            trained_models,
        )


@contextmanager
def open_stage(
    stage: str,
    task_name: str,
    params_path: str | Path = "params.yaml",
    overrides: dict[str, Any] | None = None,
    pipeline_run_id: str | None = None,
) -> Iterator[Stage]:
    params = load_params(params_path, overrides)
    cfg = params.task(task_name)
    # under torchrun each rank draws its own augmentations (DDP copies rank 0's initial weights to all)
    seeds = seed_everything(params.seed + accelerate.rank())
    task = get_task(task_name, cfg)
    extra = {"overrides": json.dumps(overrides)} if overrides else None
    # one id per pipeline run: the same for every stage of it, different when anything differs
    pipeline_run_id = tracking.resolve_pipeline_run_id(pipeline_run_id, params_path, overrides)
    if not accelerate.is_main():  # only rank 0 opens an MLflow run (and writes: tasks.paths)
        yield Stage(params, stage, task_name, cfg, task, seeds, "")
        return
    if accelerate.world_size() > 1:
        extra = {**(extra or {}), "processes": accelerate.world_size()}
    # one writer per task and stage; SIGTERM/SIGINT unwind the stage (run KILLED, temporary folder removed)
    with (
        runstate.guard(task_name, stage),
        tracking.stage_run(params, task_name, stage, cfg, seeds, pipeline_run_id, extra_params=extra) as run_id,
    ):
        yield Stage(params, stage, task_name, cfg, task, seeds, run_id)


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    return path
