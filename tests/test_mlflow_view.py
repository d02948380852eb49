"""What the MLflow UI shows of a pipeline run, read back through the MLflow API from a real SQLite
store: one parent row per pipeline run with its settings and results, the training-runs view,
dataset inputs, logged models, pictures, and two runs that differ by one override kept apart."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks import augmented, baseline, evaluate, normstats, validate
from tasks.track import tracking

# one epoch on the tiny shapes: the figures only need to exist, not to be good
FAST = {
    "tasks.classification.train.epochs": 1,
    "tasks.classification.overfit_check.enabled": False,
    "tasks.classification.train.track_train_metric": False,
}
LR = "tasks.classification.train.optimizer.lr"


def run_pipeline(params, overrides: dict) -> None:
    for stage in (validate, normstats, baseline, augmented, evaluate):
        stage.run("classification", params, overrides)


@pytest.fixture(scope="module")
def two_runs(tiny_shapes, tmp_path_factory):
    """Two pipeline runs of the same params.yaml, one override apart, in a fresh store, ids by default."""
    import mlflow

    from tests.conftest import tiny_overrides, write_params

    root = tmp_path_factory.mktemp("view")
    shutil.copytree(tiny_shapes, root / "data" / "shapes")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("CV_PIPELINE_RUN_ID", raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("CV_MLFLOW_ARTIFACT_ROOT", str(root / "mlartifacts"))
        params = write_params(root, tiny_overrides(**FAST))
        run_pipeline(params, {LR: 0.001})
        run_pipeline(params, {LR: 0.002})
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cv-classification")
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'pipeline'", order_by=["attributes.start_time ASC"])
    return SimpleNamespace(root=root, client=client, exp=exp, parents=parents)


@pytest.fixture
def in_root(two_runs, monkeypatch):
    monkeypatch.chdir(two_runs.root)
    return two_runs


def test_two_runs_one_override_apart_are_two_rows_differing_in_that_param(two_runs):
    exp, parents = two_runs.exp, two_runs.parents
    assert exp.tags[tracking.EXPERIMENT_KIND[0]] == tracking.EXPERIMENT_KIND[1]  # opens on the runs table
    assert len(parents) == 2
    first, second = (p.data.params for p in parents)
    changed = {k for k in first.keys() | second.keys() if first.get(k) != second.get(k)}
    # the override is a param of the task's settings ("train.optimizer.lr") and of the run ("overrides")
    assert changed == {"train.optimizer.lr", "overrides"}, changed
    assert (first["train.optimizer.lr"], second["train.optimizer.lr"]) == ("0.001", "0.002")
    assert first["seed"] == "42" and first["model.name"] == second["model.name"]


def test_the_parent_row_carries_results_span_inputs_and_models(in_root):
    client, exp, parents = in_root.client, in_root.exp, in_root.parents
    parent = parents[1]
    m = parent.data.metrics
    test = json.loads(open("outputs/classification/evaluate/metrics.json").read())
    for model in ("dummy", "baseline", "augmented"):
        assert m[f"test.{model}.accuracy"] == pytest.approx(test[model]["accuracy"])
    assert m["best_val.augmented.accuracy"] > 0 and m["train_seconds"] > 0
    assert (
        parent.data.tags["data_version"]
        == json.loads(open("outputs/classification/validate/report.json").read())["data_version"]["all"]["digest"]
    )
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
        ("classification-test", ["testing"])
    ]
    # models: the two trained models are outputs of the row
    models = [client.get_logged_model(o.model_id) for o in parent.outputs.model_outputs]
    assert sorted(lm.name for lm in models) == ["classification-augmented", "classification-baseline"]
    assert all(str(lm.status).endswith("READY") and lm.source_run_id == parent.info.run_id for lm in models)
    assert {lm.tags["stage_run_id"] for lm in models} == {
        c.info.run_id for c in children if c.data.tags["stage"] in ("baseline", "augmented")
    }
    # charts and pictures
    assert len(client.get_metric_history(parent.info.run_id, "val_accuracy")) == 1  # one epoch
    pictures = {
        f.path
        for stage in ("augmented", "evaluate")
        for f in client.list_artifacts(parent.info.run_id, f"plots/{stage}")
    }
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


def visible_text(dom: str) -> str:
    import re

    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.mark.e2e
def test_the_ui_shows_the_pipeline_rows_with_their_primary_test_metric(two_runs, tmp_path):
    """A real `mlflow server` on the store, a real headless Chromium on its runs table."""
    from tasks.track.mlflow_view import runs_table_url
    from tests.browser import dump_dom, find_chromium, mlflow_server, screenshot

    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "no Chromium on PATH (chromium / chromium-browser / google-chrome): "
            "`apt-get install chromium` (.ci/run does it where apt-get and root are available)"
        )
    store = f"sqlite:///{two_runs.root / 'mlflow.db'}"
    with mlflow_server(store, two_runs.root / "mlartifacts", tmp_path / "server.log") as base:
        url = runs_table_url(base, two_runs.exp.experiment_id)
        text = ""
        for attempt in range(3):  # a busy machine may need more than one virtual-time budget
            text = visible_text(dump_dom(chromium, url, tmp_path / f"profile{attempt}", width=1600, height=900))
            if "test.augmented.accuracy" in text:
                break
        if shot := os.environ.get("CV_MLFLOW_SCREENSHOT"):  # the docs' picture: CV_MLFLOW_SCREENSHOT=docs/x.png
            screenshot(chromium, url, Path(shot).resolve(), tmp_path / "profile-shot", width=2200, height=560)
    # the training-runs table, not the GenAI overview
    assert "Run Name" in text and "Token Usage" not in text, text[:2000]
    assert "test.augmented.accuracy" in text, text[:3000]
    for parent in two_runs.parents:  # both pipeline rows, each with its primary test metric
        assert parent.info.run_name in text
        value = parent.data.metrics["test.augmented.accuracy"]
        assert str(value)[:5] in text, (value, text[:3000])
    assert "classification-test" in text  # the Dataset column
    assert "classification-augmented" in text  # the Models column


def test_a_prefect_flow_run_is_tagged_with_its_link(monkeypatch):
    from prefect.settings import PREFECT_UI_URL, temporary_settings  # tracking asks Prefect only once it is loaded

    run_id = "0b6c1f7e-2f7a-4c55-9a38-6a1f3b0c2d4e"
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", run_id)  # what a deployment's worker process gets
    with temporary_settings({PREFECT_UI_URL: "http://127.0.0.1:4200"}):
        tags = tracking.pipeline_tags()
    assert tags["prefect_flow_run_id"] == run_id
    assert tags["prefect_flow_run_url"] == f"http://127.0.0.1:4200/runs/flow-run/{run_id}"
