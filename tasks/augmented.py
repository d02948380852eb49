"""Stage 4: the same model with the augmentations switched on in params.yaml (one improvement)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.paths import atomic_dir, outputs
from tasks.stage import open_stage
from tasks.training.train import preview, summary_metrics, timings, train_model, write_metrics


def run(
    task_name: str,
    params_path: str | Path = "params.yaml",
    overrides: dict[str, Any] | None = None,
    pipeline_run_id: str | None = None,
) -> dict:
    with open_stage("augmented", task_name, params_path, overrides, pipeline_run_id) as st:
        out_dir = outputs(task_name, "augmented")
        augment = st.cfg.augment
        print(f"[augmented] {task_name}: augmentations {augment.enabled_names() or 'none'}")
        with atomic_dir(out_dir) as tmp:  # all or nothing
            preview(st, augment, tmp / "augment_preview.png")
            result, _ = train_model(st, augment=augment, out_dir=tmp, keep_checkpoint=True)
            metrics = {**summary_metrics(st, result), "augmentations": augment.enabled_names()}
            write_metrics(tmp, metrics, timings(result))
        st.log_artifacts(out_dir, "augmented")
        st.log_pictures(out_dir)
        m = st.task.primary_metric
        print(f"[augmented] best val {m} = {result.best_metrics[m]:.4f} (epoch {result.best_epoch})")
        return metrics
