"""Transfer learning without a download: train a torchvision classifier on an ImageFolder dataset (by
default the embedded shapes) and save it as a checkpoint that DVC versions. Any task can then start
from it: classifiers of the same architecture with ``model.weights: models/pretrain/backbone.pt``,
detectors and segmenters through ``model.options.backbone_weights`` (their trunk loads, the head is new).

The stage stands alone (its own data path, image size and training settings under ``pretrain:`` in
params.yaml), so it runs whatever tasks the pipeline has."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from cv_models import TASKS, get_task
from cv_models.normalize import Normalize, RunningStats
from tasks.config import PretrainConfig, TaskConfig, load_params
from tasks.stage import write_json
from tasks.track import tracking
from tasks.training import engine, runstate
from tasks.training.seeding import seed_everything


def task_config(pre: PretrainConfig) -> TaskConfig:
    """The classification settings the pretraining trains with (classification's own schema)."""
    return TASKS["classification"].settings.model_validate(
        dict(
            data={"path": pre.data, "split_from": pre.split_from},
            image_size=pre.image_size,
            model={"name": pre.model},
            augment=pre.augment.model_dump(),
            train={
                "epochs": pre.epochs,
                "batch_size": pre.batch_size,
                "optimizer": {"name": "adamw", "lr": pre.lr},
                "scheduler": {"name": "onecycle"},
                "num_threads": pre.num_threads,
                "device": pre.device,
                "track_train_metric": False,
            },
        )
    )


def channel_normalizer(task, size: int) -> Normalize:
    """Per-channel mean and std of the training split (one streaming pass), as the normstats stage does."""
    stats = RunningStats()
    data = task.dataset("train", task.eval_transforms(None))
    for i in range(len(data)):
        stats.update(data[i][0].as_subclass(torch.Tensor))
    result = stats.result()
    return Normalize(
        "per_channel_std", torch.tensor(result["per_channel_mean"]), torch.tensor(result["per_channel_std"])
    )


def run(
    params_path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None, pipeline_run_id: str | None = None
) -> dict:
    params = load_params(params_path, overrides)
    pre = params.pretrain
    cfg = task_config(pre)
    seeds = seed_everything(params.seed)
    task = get_task("classification", cfg)
    with (
        runstate.guard("pretrain", "pretrain"),
        tracking.stage_run(params, "pretrain", "pretrain", cfg, seeds, pipeline_run_id),
    ):
        import mlflow

        norm = channel_normalizer(task, pre.image_size)
        augment = pre.augment if pre.augment.enabled_names() else None
        train = task.dataset("train", task.train_transforms(augment, norm))
        val = task.dataset("val", task.eval_transforms(norm))
        out = Path(pre.out)
        metrics_path = out.with_name(f"{out.stem}.metrics.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        # write beside the target, then rename: the checkpoint is whole or absent, and nothing else in
        # its folder is touched (``out`` may sit in a folder holding other files)
        with tempfile.TemporaryDirectory(prefix=f".pretrain.tmp-{os.getpid()}-", dir=out.parent) as tmp:
            tmp = Path(tmp)
            result = engine.fit(
                task,
                task.build_model(),
                train,
                val,
                cfg.train,
                params.seed,
                tmp / out.name,
                log_metrics=lambda m, step: mlflow.log_metrics(m, step=step),
                desc="pretrain",
            )
            blob = torch.load(tmp / out.name, map_location="cpu", weights_only=True)
            blob.update(
                {
                    "architecture": pre.model,
                    "pretrained_on": pre.data,
                    "normalization": {"mean": norm.mean.tolist(), "std": norm.std.tolist()},
                }
            )
            torch.save(blob, tmp / out.name)
            metrics = {
                "val_accuracy": result.best_metrics["accuracy"],
                "epochs": pre.epochs,
                "architecture": pre.model,
            }  # repeatable; the wall-clock time goes to MLflow only
            mlflow.log_metric("train_seconds", result.seconds)
            write_json(tmp / metrics_path.name, metrics)
            os.replace(tmp / metrics_path.name, metrics_path)
            os.replace(tmp / out.name, out)
        for path in (out, metrics_path):
            mlflow.log_artifact(str(path), "pretrain")
        print(f"[pretrain] {pre.model} on {pre.data}: val accuracy {metrics['val_accuracy']:.4f} -> {out}")
        return metrics
