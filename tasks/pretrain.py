"""Transfer learning without a download: train a torchvision classifier on one dataset (by default the
embedded shapes) and save it as a checkpoint that DVC versions. Any task can then start from it with
``model.weights: models/pretrain/backbone.pt`` (classifiers of the same architecture load all but the
head; detection and segmentation backbones of the same name load its trunk)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cv_models import get_task
from tasks import engine
from tasks.config import load_params
from tasks.paths import atomic_dir
from tasks.stage import open_stage, write_json
from tasks.train import normalizer


def run(params_path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None,
        pipeline_run_id: str | None = None) -> dict:
    pre = load_params(params_path, overrides).pretrain
    pre_overrides = {**(overrides or {}),
                     f"tasks.{pre.task}.model.name": pre.model, f"tasks.{pre.task}.model.weights": "none",
                     f"tasks.{pre.task}.model.freeze_backbone": False, f"tasks.{pre.task}.model.frozen_layers": [],
                     f"tasks.{pre.task}.train.epochs": pre.epochs}
    with open_stage("pretrain", pre.task, params_path, pre_overrides, pipeline_run_id) as st:
        task = get_task(pre.task, st.cfg)
        norm = normalizer(st)
        train = task.dataset("train", task.train_transforms(None, norm))
        val = task.dataset("val", task.eval_transforms(norm))
        out = Path(pre.out)
        with atomic_dir(out.parent) as tmp:
            result = engine.fit(task, task.build_model(), train, val, st.cfg.train, st.params.seed, tmp / out.name,
                                log_metrics=lambda m, step: st.log_metrics(m, step=step), desc="pretrain")
            blob = torch.load(tmp / out.name, map_location="cpu", weights_only=True)
            blob.update({"architecture": pre.model, "pretrained_on": st.cfg.data.path})
            torch.save(blob, tmp / out.name)
            metrics = {f"val_{task.primary_metric}": result.best_metrics[task.primary_metric], "epochs": pre.epochs,
                       "architecture": pre.model, "train_seconds": round(result.seconds, 2)}
            write_json(tmp / "metrics.json", metrics)
        st.log_artifacts(out.parent, "pretrain")
        print(f"[pretrain] {pre.model} on {st.cfg.data.path}: val {task.primary_metric} "
              f"{metrics[f'val_{task.primary_metric}']:.4f} -> {out}")
        return metrics
