"""What the MLflow UI shows of a pipeline run, beyond the per-stage runs of tasks/track/tracking.py.

* the data splits each stage used, as MLflow dataset inputs (Dataset column and filter), with the
  validate stage's digest of the split (tasks/track/data_version.py), the data folder and the sample count;
* the models the training stages wrote, as MLflow logged models (Model column);
* one row per pipeline run: the parent run gets the headline test metrics of dummy, baseline and
  augmented, the best validation metric, the training seconds, the data version, the per-epoch
  curves and the pictures of every stage (``plots/<stage>/``).

Every call names its run explicitly (no active run): the Prefect flow runs stages in threads.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

from tasks.track.data_version import read_data_version

SPLIT_CONTEXT = {"train": "training", "val": "validation", "test": "testing"}
PICTURES = (".png", ".jpg", ".jpeg", ".svg")


def client():
    import mlflow

    return mlflow.MlflowClient()


def parent_of(run_id: str) -> str | None:
    return client().get_run(run_id).data.tags.get("mlflow.parentRunId")


# ---------------------------------------------------------------- datasets


def split_dataset(task_name: str, split: str, data_path: str | Path):
    """One split as an MLflow dataset: digest from the validate stage, source = the data folder."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    version = read_data_version(task_name, split)

    class SplitDataset(MetaDataset):
        """A dataset described, not loaded: MLflow stores its digest, source and profile (sample count)."""

        @property
        def profile(self) -> dict:
            return {"num_samples": version["n_samples"], "split": split}

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self.profile)}

    with warnings.catch_warnings():  # a local folder matches MLflow's local-artifact source twice: same class
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(Path(data_path).resolve()))
    # the UI shows only the first characters of a digest: the validate stage's sha256, shortened
    return SplitDataset(source=source, name=f"{task_name}-{split}", digest=version["digest"][:16])


def log_split_inputs(run_ids: Iterable[str], task_name: str, data_path: str | Path, splits: Iterable[str]) -> None:
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [
        DatasetInput(
            split_dataset(task_name, s, data_path)._to_mlflow_entity(),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, SPLIT_CONTEXT.get(s, s))],
        )
        for s in splits
    ]
    c = client()
    for run_id in dict.fromkeys(r for r in run_ids if r):
        c.log_inputs(run_id, datasets=inputs)


# ---------------------------------------------------------------- models


def log_model_file(run_id: str, name: str, model_path: Path, params: dict[str, Any], metrics: dict[str, float]) -> str:
    """The stage's ``model.pt`` as an MLflow logged model, an output of the stage run and of its
    pipeline run (the Model column of the pipeline row). The file stays this pipeline's checkpoint format
    (``tasks.training.engine.load_model`` reads it); the registry (issue 14) logs a loadable flavour."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

    c = client()
    run = c.get_run(run_id)
    parent = run.data.tags.get("mlflow.parentRunId")
    # MLflow 3.17's runs table fills the Model column from the models whose *source* run a row is:
    # the pipeline run, whose row is the one compared; the stage run is kept as a tag and an output
    model = c.create_logged_model(
        experiment_id=run.info.experiment_id,
        name=name,
        source_run_id=parent or run_id,
        tags={"stage_run_id": run_id},
        params={k: str(v)[:6000] for k, v in params.items()},
        model_type="pytorch",
    )
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model_path, Path(tmp) / Path(model_path).name)
        c.log_model_artifacts(model.model_id, tmp)
    c.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    if metrics:  # shown on the model's page, linked to the run that measured them
        import time

        now = int(time.time() * 1000)
        c.log_batch(run_id, metrics=[Metric(k, float(v), now, 0, model_id=model.model_id) for k, v in metrics.items()])
    for rid in (run_id, parent):
        if rid:
            c.log_outputs(rid, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_id


# ---------------------------------------------------------------- pictures


def log_pictures(run_id: str | None, folder: Path, stage: str) -> None:
    """Every picture a stage wrote, under ``plots/<stage>/`` of the pipeline run: one place to look."""
    if not run_id:
        return
    c = client()
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix.lower() in PICTURES and path.is_file():
            c.log_artifact(run_id, str(path), f"plots/{stage}")


# ---------------------------------------------------------------- the pipeline row

TIMINGS = ("images_per_second", "latency_ms")


def pipeline_metrics(primary: str, test: dict[str, dict], trained: dict[str, dict]) -> dict[str, float]:
    """The figures of one pipeline run, in the order they appear as columns: the primary test metric
    of every model first, then the other headline test metrics, the best validation metric and the
    training seconds. ``test``: evaluate's metrics per model; ``trained``: the training stages'
    metrics.json and timings.json (best val metric, seconds), in the chain's order."""
    out: dict[str, float] = {}
    models = [m for m in row_models(trained) if m in test]
    for model in models:
        out[f"test.{model}.{primary}"] = test[model][primary]
    for model in models:
        out.update(
            {
                f"test.{model}.{k}": v
                for k, v in test[model].items()
                if "/" not in k and k not in (primary, "loss", *TIMINGS) and isinstance(v, (int, float))
            }
        )
    for model, m in trained.items():
        if f"val_{primary}" in m:
            out[f"best_val.{model}.{primary}"] = m[f"val_{primary}"]
    seconds = [m["train_seconds"] for m in trained.values() if "train_seconds" in m]
    if seconds:
        out["train_seconds"] = float(sum(seconds))
    return {k: float(v) for k, v in out.items() if not isinstance(v, bool)}


def row_models(trained: Iterable[str]) -> list[str]:
    """The models in the order of the row's columns: the trained ones last trained first (the augmented model,
    the headline), then the dummy solution."""
    return [*reversed(list(trained)), "dummy"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def summarise_pipeline(
    parent_id: str, task_name: str, primary: str, test: dict[str, dict], outputs_of, trained_models: tuple[str, ...]
) -> None:
    """Put the pipeline run's results on its parent run (one row of the runs table), from the files
    the stages wrote: that works whether the stages ran in this process (Prefect) or each in its own
    (``dvc repro``, which may also skip stages whose outputs are up to date). ``outputs_of(stage)``
    is the stage's output folder; ``trained_models``: the stages that train a model (tasks.chain.TRAINED)."""
    import time

    import pandas as pd
    from mlflow.entities import Metric, RunTag

    c = client()
    # the best val metric from metrics.json, the wall-clock seconds from timings.json (kept apart: tasks/training/train.py)
    trained = {
        m: {**read_json(outputs_of(m) / "metrics.json"), **read_json(outputs_of(m) / "timings.json")}
        for m in trained_models
    }
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in pipeline_metrics(primary, test, trained).items()]
    # the augmented model's per-epoch curves under the stable names of the stage runs, so the chart
    # view overlays pipeline runs too; logged once (evaluate may run again for the same pipeline run)
    history = outputs_of(trained_models[-1]) / "history.csv"
    if history.exists():
        df = pd.read_csv(history)
        for key in ("train_loss", f"val_{primary}"):
            if key in df.columns and not c.get_metric_history(parent_id, key):
                metrics += [
                    Metric(key, float(v), now, int(e)) for e, v in zip(df["epoch"], df[key]) if pd.notna(v)
                ]  # epochs without validation (train.val_every) have no val metrics
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
        c.log_batch(parent_id, metrics=metrics[i : i + 1000])
    version = read_data_version(task_name)
    c.log_batch(parent_id, tags=[RunTag("data_version", version["digest"]), RunTag("primary_metric", primary)])
    save_runs_view(c.get_run(parent_id).info.experiment_id, primary, trained_models)


# ---------------------------------------------------------------- opening the UI on the rows

# A saved view of the runs table, stored as an experiment tag that the MLflow UI reads when the URL
# names it (``?viewStateShareKey=``): the pipeline rows' headline columns shown, newest first.
VIEW_KEY = "pipeline-runs"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."


def column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # the UI's column id: attributes / metrics / params / tags


def runs_view(primary: str, trained_models: tuple[str, ...]) -> dict:
    cols = [column("attributes", "Dataset"), column("attributes", "Models")]
    cols += [column("metrics", f"test.{m}.{primary}") for m in row_models(trained_models)]
    cols += [column("metrics", f"best_val.{trained_models[-1]}.{primary}"), column("metrics", "train_seconds")]
    return {"selectedColumns": cols, "orderByKey": "attributes.start_time", "orderByAsc": False}


def save_runs_view(experiment_id: str, primary: str, trained_models: tuple[str, ...]) -> None:
    client().set_experiment_tag(
        experiment_id, VIEW_TAG_PREFIX + VIEW_KEY, json.dumps(runs_view(primary, trained_models))
    )


def runs_table_url(base_url: str, experiment_id: str) -> str:
    """The experiment's training-runs table with the pipeline columns. ``workflowType``: MLflow 3.17's
    UI opens every experiment on the GenAI overview unless its global switch (or this parameter)
    says "machine learning"; the experiment's ``mlflow.experimentKind`` tag is what older 3.x UIs read."""
    return (
        f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
        f"?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"
    )


def main(argv: list[str] | None = None) -> None:
    """Print the runs-table link of every task's experiment: ``python -m tasks.track.mlflow_view [PORT]``."""
    import sys

    import mlflow

    from tasks.config import load_params
    from tasks.track.tracking import tracking_uri

    argv = sys.argv[1:] if argv is None else argv
    base = f"http://127.0.0.1:{argv[0] if argv else 5000}"
    params = load_params("params.yaml")
    mlflow.set_tracking_uri(tracking_uri(params))
    for exp in client().search_experiments():
        if exp.name.startswith(params.tracking.experiment_prefix):
            print(f"  {exp.name}: {runs_table_url(base, exp.experiment_id)}")


if __name__ == "__main__":
    main()
