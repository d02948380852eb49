"""Stage 5: score the dummy solution, the baseline and the augmented model on the test split
(used for nothing else), side by side: DVC metrics, MLflow, and a Prefect artifact inside a flow."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

import torch

from cv_models.settings import diff_markdown, diff_text, settings_diff
from tasks.training import accelerate, engine
from tasks.chain import TRAINED
from tasks.paths import atomic_dir, models, outputs
from tasks.stage import open_stage
from tasks.training.train import normalizer

DIFF_TAG = "_vs_".join(TRAINED)  # baseline_vs_augmented: the settings in which the trained models differ


def comparison_table(results: dict, primary: str) -> pd.DataFrame:
    """One row per model, the primary metric first, then the other headline metrics."""
    rows = []
    for name, res in results.items():
        row = {"model": name, primary: res.metrics[primary]}
        row.update({k: v for k, v in res.metrics.items() if "/" not in k and k not in (primary, "loss")})
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def record_diff(changed: dict) -> None:
    """The compared models' difference on this run and on the pipeline's parent run, where the MLflow UI groups them."""
    import mlflow

    text = diff_text(changed)[:5000]
    run = mlflow.active_run()
    mlflow.set_tag(DIFF_TAG, text)
    parent = mlflow.get_run(run.info.run_id).data.tags.get("mlflow.parentRunId") if run is not None else None
    if parent:
        mlflow.MlflowClient().set_tag(parent, DIFF_TAG, text)


def publish_prefect_artifact(task_name: str, markdown: str) -> None:
    """Show the comparison in the Prefect UI when running inside a flow (no-op from the DVC CLI)."""
    if "prefect" not in sys.modules:  # no flow run without Prefect loaded: spare a DVC stage its import (seconds)
        return
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(
            markdown=markdown, key=f"{task_name.replace('_', '-')}-evaluation", description=f"{task_name}: test metrics"
        )
    except ImportError:
        return


def run(
    task_name: str,
    params_path: str | Path = "params.yaml",
    overrides: dict[str, Any] | None = None,
    pipeline_run_id: str | None = None,
) -> dict:
    with open_stage("evaluate", task_name, params_path, overrides, pipeline_run_id) as st:
        task, primary = st.task, st.task.primary_metric
        norm = normalizer(st)
        test = task.dataset("test", task.eval_transforms(norm))
        device = engine.pick_device(st.cfg.train.device)
        engine.set_threads(st.cfg.train.num_threads)
        loader = engine.make_loader(
            task, test, st.cfg.train.eval_batch_size, False, st.params.seed, engine.worker_count(st.cfg.train)
        )
        results = {"dummy": task.dummy_result(task.dataset("train", None), test)}
        speed, diagnosis = {}, {}
        for name in TRAINED:
            path = models(task_name, name) / "model.pt"
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: run the {name} stage first (dvc repro)")
            model = engine.load_model(task, path).to(device)
            acc = accelerate.Accelerator(device, st.cfg.train.precision, st.cfg.train.channels_last)
            if acc.channels_last:
                model.to(memory_format=torch.channels_last)
            with acc.autocast():  # scored as it was trained (train.precision), at each image's own resolution
                results[name] = task.evaluate(model, loader, device, native=True)
            speed[name] = engine.measure_speed(model, loader, device)
            history = outputs(task_name, name) / "history.csv"
            if history.exists():
                diagnosis[name] = engine.overfitting_verdict(pd.read_csv(history), primary)
        table = comparison_table(results, primary)
        table["images_per_second"] = [speed.get(n, {}).get("images_per_second", float("nan")) for n in table["model"]]
        table["latency_ms"] = [speed.get(n, {}).get("latency_ms", float("nan")) for n in table["model"]]
        markdown = f"# {task_name}: test split ({len(test)} samples)\n\n" + to_markdown(table) + "\n"
        # the one change being measured, stated: the effective settings in which the two models differ
        changed = settings_diff(st.cfg.without_augmentation(), st.cfg)
        markdown += (
            "\n## What differs between baseline and augmented\n\nThe effective settings of the two trained models "
            "(the baseline has every augmentation off); nothing else differs, and both start from the same "
            "initial weights (MLflow param init_weights_sha256).\n\n" + diff_markdown(changed, *TRAINED)
        )
        markdown += (
            f"\nSpeed: images/s at batch size {st.cfg.train.eval_batch_size} and the latency of one image "
            f"on {device.type}.\n"
        )
        for name, res in results.items():
            if res.per_class is not None and name != "dummy":
                markdown += f"\n## {name}: per class\n\n" + to_markdown(res.per_class) + "\n"
        alerts = {
            name: engine.silent_failure_warnings(
                results[name].metrics, results["dummy"].metrics, primary, len(task.class_names()), f"{name} (test)"
            )
            for name in TRAINED
        }
        alerts = {k: v for k, v in alerts.items() if v}
        if alerts:
            markdown += "\n## Warnings: models that learnt nothing or never predict some classes\n\n" + "".join(
                f"- **{line}**\n" for lines in alerts.values() for line in lines
            )
        notes = dict.fromkeys(line for res in results.values() for line in res.extra.get("notes", []))  # once each
        if notes:
            markdown += "\n## Notes\n\n" + "".join(f"- {line}\n" for line in notes)
        if diagnosis:
            markdown += "\n## Overfitting diagnosis (train vs validation per epoch)\n"
        for name, line in diagnosis.items():
            markdown += f"\n- {name}: {line}"
        markdown += "\n"
        registered = None
        if st.params.registry.enabled:  # the better model by validation metric, as an MLflow model in the registry
            from tasks.track import registry

            registered = registry.publish(st, {name: res.metrics for name, res in results.items()}, device)
            markdown += (
                f"\nRegistered: {registered['name']} version {registered['version']} ({registered['stage']}); "
                f"{registered['decision']}\n"
            )
        out_dir = outputs(task_name, "evaluate")
        with atomic_dir(out_dir) as tmp:
            if registered is not None:
                (tmp / "registry.json").write_text(json.dumps(registered, indent=2) + "\n")
            # speed is wall-clock: timings.json (and MLflow, comparison.md), so metrics.json repeats bit for bit
            metrics = {name: res.metrics for name, res in results.items()}
            metrics["n_test"] = len(test)
            metrics["overfitting"] = {name: line for name, line in diagnosis.items()}
            metrics["warnings"] = alerts  # model -> lines (empty when every model beat the dummy)
            metrics["settings_changed"] = {k: dict(zip(TRAINED, pair)) for k, pair in changed.items()}
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            (tmp / "timings.json").write_text(json.dumps(speed, indent=2) + "\n")
            (tmp / "comparison.md").write_text(markdown)
            details = tmp / "details"  # per-class tables, pictures, per-image predictions and how to rescore them
            details.mkdir()
            table.to_csv(details / "comparison.csv", index=False)
            for name, res in results.items():
                if res.per_class is not None:
                    res.per_class.to_csv(details / f"per_class_{name}.csv", index=False)
            task.report(results, test, details)
        for name, res in results.items():
            st.log_metrics(res.metrics | speed.get(name, {}), prefix=f"test.{name}.")
        st.log_artifacts(out_dir, "evaluation")
        record_diff(changed)
        st.log_inputs("test")
        st.log_pictures(out_dir)
        # the pipeline run's row in the MLflow UI: test metrics of all three, best val, seconds, data version
        st.log_pipeline_summary({name: res.metrics for name, res in results.items()}, TRAINED)
        publish_prefect_artifact(task_name, markdown)
        print(markdown)
        return metrics
