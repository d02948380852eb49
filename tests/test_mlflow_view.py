"""What the MLflow UI shows of a pipeline run, read back through the MLflow API from a real SQLite
store: one parent row per pipeline run with its settings and results, the training-runs view,
dataset inputs, logged models, pictures, and two runs that differ by one override kept apart."""
from __future__ import annotations

import os

import pytest

from tasks import augmented, baseline, evaluate, normstats, tracking, validate

# one epoch on the tiny shapes: the figures only need to exist, not to be good
FAST = {"tasks.classification.train.epochs": 1, "tasks.classification.overfit_check.enabled": False,
        "tasks.classification.train.track_train_metric": False}
LR = "tasks.classification.train.optimizer.lr"


def run_pipeline(params, overrides: dict) -> None:
    for stage in (validate, normstats, baseline, augmented, evaluate):
        stage.run("classification", params, overrides)


@pytest.fixture
def two_runs(project, monkeypatch, tmp_path):
    """Two pipeline runs of the same params.yaml, one override apart, in a fresh store, ids by default."""
    monkeypatch.delenv("CV_PIPELINE_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'view.db'}")
    params = project.params(**FAST)
    run_pipeline(params, {LR: 0.001})
    run_pipeline(params, {LR: 0.002})
    import mlflow

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("cv-classification")
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'pipeline'", order_by=["attributes.start_time ASC"])
    return client, exp, parents


def test_two_runs_one_override_apart_are_two_rows_differing_in_that_param(two_runs):
    client, exp, parents = two_runs
    assert exp.tags[tracking.EXPERIMENT_KIND[0]] == tracking.EXPERIMENT_KIND[1]  # opens on the runs table
    assert len(parents) == 2
    first, second = (p.data.params for p in parents)
    changed = {k for k in first.keys() | second.keys() if first.get(k) != second.get(k)}
    # the override is a param of the task's settings ("train.optimizer.lr") and of the run ("overrides")
    assert changed == {"train.optimizer.lr", "overrides"}, changed
    assert (first["train.optimizer.lr"], second["train.optimizer.lr"]) == ("0.001", "0.002")
    assert first["seed"] == "42" and first["model.name"] == second["model.name"]


def test_the_parent_row_carries_results_span_inputs_and_models(two_runs):
    import json

    client, exp, parents = two_runs
    parent = parents[1]
    m = parent.data.metrics
    test = json.loads(open("outputs/classification/evaluate/metrics.json").read())
    for model in ("dummy", "baseline", "augmented"):
        assert m[f"test.{model}.accuracy"] == pytest.approx(test[model]["accuracy"])
    assert m["best_val.augmented.accuracy"] > 0 and m["train_seconds"] > 0
    assert parent.data.tags["data_version"] == json.loads(
        open("outputs/classification/validate/report.json").read())["data_version"]["all"]["digest"]
    # it spans its stages: open from the first stage's start to the last stage's end
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["stage"] for c in children} == {"validate", "normstats", "baseline", "augmented", "evaluate"}
    assert parent.info.status == "FINISHED"
    assert parent.info.start_time <= min(c.info.start_time for c in children)
    assert parent.info.end_time >= max(c.info.end_time for c in children)
    # datasets: the three splits with the validate stage's digests and sample counts
    inputs = {d.dataset.name: d for d in parent.inputs.dataset_inputs}
    assert set(inputs) == {"classification-train", "classification-val", "classification-test"}
    report = json.loads(open("outputs/classification/validate/report.json").read())["data_version"]
    for split in ("train", "val", "test"):
        ds = inputs[f"classification-{split}"].dataset
        assert report[split]["digest"].startswith(ds.digest)
        assert json.loads(ds.profile)["num_samples"] == report[split]["n_samples"] > 0
    evaluate_run = next(c for c in children if c.data.tags["stage"] == "evaluate")
    assert [(d.dataset.name, [t.value for t in d.tags]) for d in evaluate_run.inputs.dataset_inputs] == [
        ("classification-test", ["testing"])]
    # models: the two trained models are outputs of the row
    models = [client.get_logged_model(o.model_id) for o in parent.outputs.model_outputs]
    assert sorted(lm.name for lm in models) == ["classification-augmented", "classification-baseline"]
    assert all(lm.status.to_int() == 2 or str(lm.status).endswith("READY") for lm in models)
    # charts and pictures
    assert len(client.get_metric_history(parent.info.run_id, "val_accuracy")) == 1  # one epoch
    pictures = {f.path for stage in ("augmented", "evaluate")
                for f in client.list_artifacts(parent.info.run_id, f"plots/{stage}")}
    assert "plots/augmented/augment_preview.png" in pictures
    assert any(p.startswith("plots/evaluate/confusion_matrix") for p in pictures), pictures


def test_pipeline_run_id_covers_overrides_and_the_dvc_experiment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    plain = tracking.default_pipeline_run_id("params.yaml")
    assert plain == tracking.default_pipeline_run_id("params.yaml", {})  # deterministic: every stage finds it
    assert tracking.default_pipeline_run_id("params.yaml", {"seed": 2}) != plain
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lamb")
    assert tracking.default_pipeline_run_id("params.yaml") != plain
    assert tracking.pipeline_tags()["dvc_exp_name"] == "lucky-lamb"
