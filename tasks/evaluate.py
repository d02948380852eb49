"""Stage 5: score the dummy solution, the baseline and the augmented model on the test split
(used for nothing else), side by side: DVC metrics, MLflow, and a Prefect artifact inside a flow."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
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


@dataclass
class Scores:
    """Every model's test result, with the trained models' speed and overfitting diagnosis."""

    results: dict[str, Any]  # model -> EvalResult, the dummy first
    speed: dict[str, dict] = field(default_factory=dict)
    diagnosis: dict[str, str] = field(default_factory=dict)

    def metrics(self) -> dict[str, dict]:
        return {name: res.metrics for name, res in self.results.items()}


def score_models(st, test, device) -> Scores:
    """The dummy, then each trained model scored as it was trained (train.precision), at each image's own resolution."""
    task, cfg = st.task, st.cfg.train
    engine.set_threads(cfg.num_threads)
    loader = engine.make_loader(task, test, cfg.eval_batch_size, False, st.params.seed, engine.worker_count(cfg))
    scores = Scores({"dummy": task.dummy_result(task.dataset("train", None), test)})
    for name in TRAINED:
        path = models(st.task_name, name) / "model.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the {name} stage first (dvc repro)")
        model = engine.load_model(task, path).to(device)
        acc = accelerate.Accelerator(device, cfg.precision, cfg.channels_last)
        if acc.channels_last:
            model.to(memory_format=torch.channels_last)
        with acc.autocast():
            scores.results[name] = task.evaluate(model, loader, device, native=True)
        scores.speed[name] = engine.measure_speed(model, loader, device)
        history = outputs(st.task_name, name) / "history.csv"
        if history.exists():
            scores.diagnosis[name] = engine.overfitting_verdict(pd.read_csv(history), task.primary_metric)
    return scores


def speed_table(scores: Scores, primary: str) -> pd.DataFrame:
    """:func:`comparison_table` with each model's images per second and latency (NaN for the dummy)."""
    table = comparison_table(scores.results, primary)
    for column in ("images_per_second", "latency_ms"):
        table[column] = [scores.speed.get(n, {}).get(column, float("nan")) for n in table["model"]]
    return table


def silent_failures(st, scores: Scores) -> dict[str, list[str]]:
    """Per trained model, the warnings of one that learnt nothing or never predicts some classes (only those with any)."""
    primary, n_classes, dummy = st.task.primary_metric, len(st.task.class_names()), scores.results["dummy"].metrics
    alerts = {
        name: engine.silent_failure_warnings(scores.results[name].metrics, dummy, primary, n_classes, f"{name} (test)")
        for name in TRAINED
    }
    return {k: v for k, v in alerts.items() if v}


def comparison_markdown(st, n_test: int, table: pd.DataFrame, changed: dict, device) -> str:
    """The comparison's head: the table, the one change being measured (the effective settings in which the two
    models differ) and what the speed columns mean."""
    markdown = f"# {st.task_name}: test split ({n_test} samples)\n\n" + to_markdown(table) + "\n"
    markdown += (
        "\n## What differs between baseline and augmented\n\nThe effective settings of the two trained models "
        "(the baseline has every augmentation off); nothing else differs, and both start from the same "
        "initial weights (MLflow param init_weights_sha256).\n\n" + diff_markdown(changed, *TRAINED)
    )
    return markdown + (
        f"\nSpeed: images/s at batch size {st.cfg.train.eval_batch_size} and the latency of one image "
        f"on {device.type}.\n"
    )


def details_markdown(scores: Scores, alerts: dict[str, list[str]]) -> str:
    """Per-class tables of the trained models, warnings, the models' notes (once each) and the overfitting lines."""
    markdown = ""
    for name, res in scores.results.items():
        if res.per_class is not None and name != "dummy":
            markdown += f"\n## {name}: per class\n\n" + to_markdown(res.per_class) + "\n"
    if alerts:
        markdown += "\n## Warnings: models that learnt nothing or never predict some classes\n\n" + "".join(
            f"- **{line}**\n" for lines in alerts.values() for line in lines
        )
    notes = dict.fromkeys(line for res in scores.results.values() for line in res.extra.get("notes", []))
    if notes:
        markdown += "\n## Notes\n\n" + "".join(f"- {line}\n" for line in notes)
    if scores.diagnosis:
        markdown += "\n## Overfitting diagnosis (train vs validation per epoch)\n"
    for name, line in scores.diagnosis.items():
        markdown += f"\n- {name}: {line}"
    return markdown + "\n"


def register(st, scores: Scores, device) -> dict | None:
    """With registry.enabled: the better model by validation metric, as an MLflow model in the registry."""
    if not st.params.registry.enabled:
        return None
    from tasks.track import registry

    return registry.publish(st, scores.metrics(), device)


def registered_line(registered: dict) -> str:
    return (
        f"\nRegistered: {registered['name']} version {registered['version']} ({registered['stage']}); "
        f"{registered['decision']}\n"
    )


def stage_metrics(scores: Scores, n_test: int, alerts: dict, changed: dict) -> dict:
    """metrics.json: no wall-clock figure (speed goes to timings.json, MLflow and comparison.md), so it repeats
    bit for bit."""
    metrics: dict[str, Any] = scores.metrics()
    metrics["n_test"] = n_test
    metrics["overfitting"] = dict(scores.diagnosis)
    metrics["warnings"] = alerts  # model -> lines (empty when every model beat the dummy)
    metrics["settings_changed"] = {k: dict(zip(TRAINED, pair)) for k, pair in changed.items()}
    return metrics


def write_outputs(st, out_dir: Path, files: dict[str, Any], scores: Scores, table: pd.DataFrame, test) -> None:
    """``files`` (name -> JSON object or Markdown text) and ``details/``: per-class tables, pictures, per-image
    predictions and how to rescore them; all or nothing."""
    with atomic_dir(out_dir) as tmp:
        for name, content in files.items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
            (tmp / name).write_text(text)
        details = tmp / "details"
        details.mkdir()
        table.to_csv(details / "comparison.csv", index=False)
        for name, res in scores.results.items():
            if res.per_class is not None:
                res.per_class.to_csv(details / f"per_class_{name}.csv", index=False)
        st.task.report(scores.results, test, details)


def log_run(st, out_dir: Path, scores: Scores, changed: dict) -> None:
    """MLflow: test metrics and speed per model, the outputs, the settings diff, the data, the pictures, and the
    pipeline run's row (test metrics of all three, best val, seconds, data version)."""
    for name, res in scores.results.items():
        st.log_metrics(res.metrics | scores.speed.get(name, {}), prefix=f"test.{name}.")
    st.log_artifacts(out_dir, "evaluation")
    record_diff(changed)
    st.log_inputs("test")
    st.log_pictures(out_dir)
    st.log_pipeline_summary(scores.metrics(), TRAINED)


def run(
    task_name: str,
    params_path: str | Path = "params.yaml",
    overrides: dict[str, Any] | None = None,
    pipeline_run_id: str | None = None,
) -> dict:
    with open_stage("evaluate", task_name, params_path, overrides, pipeline_run_id) as st:
        test = st.task.dataset("test", st.task.eval_transforms(normalizer(st)))
        device = engine.pick_device(st.cfg.train.device)
        scores = score_models(st, test, device)
        table = speed_table(scores, st.task.primary_metric)
        changed = settings_diff(st.cfg.without_augmentation(), st.cfg)
        alerts = silent_failures(st, scores)
        markdown = comparison_markdown(st, len(test), table, changed, device) + details_markdown(scores, alerts)
        registered = register(st, scores, device)
        if registered is not None:
            markdown += registered_line(registered)
        metrics = stage_metrics(scores, len(test), alerts, changed)
        files = {"registry.json": registered} if registered is not None else {}
        files |= {"metrics.json": metrics, "timings.json": scores.speed, "comparison.md": markdown}
        out_dir = outputs(task_name, "evaluate")
        write_outputs(st, out_dir, files, scores, table, test)
        log_run(st, out_dir, scores, changed)
        publish_prefect_artifact(task_name, markdown)
        print(markdown)
        return metrics
