"""Controlled comparisons: every model of a task trained with one seed starts from the same weights."""

from __future__ import annotations

import mlflow
import pytest

from tasks import augmented, baseline
from tasks.training import engine
from tasks.training.seeding import init_seed, isolated_rng, state_sha256

TASK_NAMES = ("classification", "segmentation", "detection", "instance_segmentation")


class _StopBeforeTraining(Exception):
    pass


def _no_training(*args, **kwargs):
    raise _StopBeforeTraining


def _hash(run_id: str) -> str:
    return mlflow.MlflowClient().get_run(run_id).data.params["init_weights_sha256"]


def _stage_run_id(pipeline_run_id: str, stage: str) -> str:
    runs = mlflow.search_runs(
        search_all_experiments=True,
        output_format="list",
        filter_string=f"tags.pipeline_run_id = '{pipeline_run_id}' and tags.stage = '{stage}'",
    )
    assert len(runs) == 1
    return runs[0].info.run_id


def _tiny(task_name: str, seed: int) -> dict:
    t = f"tasks.{task_name}."
    return {
        "seed": seed,
        t + "normalization": "none",
        t + "image_size": 64,
        t + "train.epochs": 1,
        t + "overfit_check.steps": 1,
        t + "overfit_check.max_loss": 1e9,
        t + "preview_samples": 2,
    }


@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_baseline_and_augmented_start_from_the_same_weights(project, monkeypatch, task_name):
    """The stages draw different amounts from the global generator before building (overfit check,
    augmentation preview); the logged init hash must not notice. Training itself is cut off: only the start counts."""
    monkeypatch.setattr(engine, "fit", _no_training)
    hashes = {}
    for seed in (7, 8):
        params = project.params(**_tiny(task_name, seed))
        for stage in (baseline, augmented):
            name = stage.__name__.rsplit(".", 1)[-1]
            run = f"init-{task_name}-{seed}-{name}"
            with pytest.raises(_StopBeforeTraining):
                stage.run(task_name, params, pipeline_run_id=run)
            hashes[seed, name] = _hash(_stage_run_id(run, name))
    assert hashes[7, "baseline"] == hashes[7, "augmented"]
    assert hashes[8, "baseline"] == hashes[8, "augmented"]
    assert hashes[7, "baseline"] != hashes[8, "baseline"]


def test_isolated_rng_neither_reads_nor_disturbs_the_global_stream():
    import torch

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with isolated_rng(init_seed(1)):
        a = torch.rand(5)
    assert torch.equal(torch.rand(3), expected)  # the stream outside went on as if nothing ran
    torch.rand(100)  # a different history before the block...
    with isolated_rng(init_seed(1)):
        b = torch.rand(5)
    assert torch.equal(a, b)  # ...same draws inside


def test_state_hash_sees_one_changed_weight():
    import torch

    model = torch.nn.Linear(3, 2)
    before = state_sha256(model)
    assert state_sha256(model) == before
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    assert state_sha256(model) != before


@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_frozen_layers_freeze_in_every_task(project, task_name):
    """model.frozen_layers does what it says for every task (not classification only); a wrong prefix is an error."""
    from cv_models import get_task
    from cv_models.weights import WeightsError
    from tasks.config import load_params

    t = f"tasks.{task_name}."
    cfg = load_params(project.params(**{t + "normalization": "none", t + "image_size": 64})).task(task_name)
    names = [n for n, _ in get_task(task_name, cfg).build_model().named_parameters()]
    first = names[0].rsplit(".", 1)[0]  # the module holding the first parameter
    frozen = cfg.model_copy(update={"model": cfg.model.model_copy(update={"frozen_layers": [first]})})
    model = get_task(task_name, frozen).build_model()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not any(v for n, v in grads.items() if n.startswith(first)) and any(grads.values())
    wrong = cfg.model_copy(update={"model": cfg.model.model_copy(update={"frozen_layers": ["no_such_layer"]})})
    with pytest.raises(WeightsError, match="no_such_layer"):
        get_task(task_name, wrong).build_model()


@pytest.mark.e2e
def test_evaluation_states_the_settings_that_differ(project):
    """comparison.md, metrics.json and the MLflow pipeline parent run name the compared models' one change."""
    import json
    from pathlib import Path

    from tasks import evaluate

    t = "tasks.classification."
    params = project.params(
        **{
            t + "train.epochs": 1,
            t + "overfit_check.enabled": False,
            t + "normalization": "none",
            t + "augment.color.enabled": False,
        }
    )
    for stage in (baseline, augmented, evaluate):
        stage.run("classification", params, pipeline_run_id="compare")
    text = Path("outputs/classification/evaluate/comparison.md").read_text()
    assert "## What differs between baseline and augmented" in text
    for name in ("hflip", "vflip", "rotation"):  # switched on in params.yaml (color switched off above)
        assert f"| `augment.{name}.enabled` | False | True |" in text
    assert "augment.color" not in text
    changed = json.loads(Path("outputs/classification/evaluate/metrics.json").read_text())["settings_changed"]
    assert set(changed) == {"augment.hflip.enabled", "augment.vflip.enabled", "augment.rotation.enabled"}
    parent = mlflow.MlflowClient().get_run(_stage_run_id("compare", "evaluate")).data.tags["mlflow.parentRunId"]
    tag = mlflow.MlflowClient().get_run(parent).data.tags["baseline_vs_augmented"]
    assert "augment.hflip.enabled: False -> True" in tag
