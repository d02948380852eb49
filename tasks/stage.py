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
from cv_models.base import CVTask  # noqa: E402
from tasks import tracking  # noqa: E402
from tasks.config import Params, TaskConfig, load_params  # noqa: E402
from tasks.seeding import seed_everything  # noqa: E402


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
        import mlflow

        clean = {prefix + k.replace("/", "."): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        mlflow.log_metrics(clean, step=step)

    def log_params(self, values: dict[str, Any]) -> None:
        import mlflow

        mlflow.log_params({k: str(v)[:6000] for k, v in values.items()})

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


@contextmanager
def open_stage(stage: str, task_name: str, params_path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None,
               pipeline_run_id: str | None = None) -> Iterator[Stage]:
    params = load_params(params_path, overrides)
    cfg = params.task(task_name)
    seeds = seed_everything(params.seed)
    task = get_task(task_name, cfg)
    extra = {"overrides": json.dumps(overrides)} if overrides else None
    with tracking.stage_run(params, task_name, stage, cfg, seeds, pipeline_run_id, extra_params=extra) as run_id:
        yield Stage(params, stage, task_name, cfg, task, seeds, run_id)


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    return path
