"""The ablation's baseline and arms are planned from the task's schema: every augmentation off, one change per arm."""

from __future__ import annotations

import pytest

from tasks.config import ConfigError, load_params
from tasks.runners import ablation
from tests.conftest import REPO, write_params

TASK_NAMES = ("classification", "segmentation", "detection", "instance_segmentation")


@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_baseline_has_every_augmentation_off_and_each_arm_differs_by_its_change(tmp_path, task_name):
    from cv_models import TASKS

    switches = TASKS[task_name].augment_schema().switch_names()
    path = write_params(tmp_path, {"ablation.arms": switches + ["label_smoothing"], "ablation.seeds": 1})
    p = ablation.plan(task_name, path, build_models=False)
    base = load_params(path, {**p.arms[0].overrides}).task(task_name)
    assert base.augment.enabled_names() == []  # mosaic and copy_paste included
    for arm in p.arms[1:]:
        (key,) = p.diffs[arm.name]
        assert key == next(iter(arm.changes))  # its named change and nothing else
        assert p.diffs[arm.name][key][0] != p.diffs[arm.name][key][1]


def test_task_specific_augmentations_are_arms_and_off_in_the_baseline(tmp_path):
    path = write_params(tmp_path, {"ablation.arms": ["mosaic"], "ablation.seeds": 1})
    p = ablation.plan("detection", path, build_models=False)
    assert p.arms[0].overrides["tasks.detection.augment.mosaic.enabled"] is False
    assert p.diffs["mosaic"] == {"augment.mosaic.enabled": (False, True)}
    with pytest.raises(ConfigError, match=r"unknown change\(s\) \['mosaic'\]"):  # classification has no mosaic
        ablation.plan("classification", write_params(tmp_path, {"ablation.arms": ["mosaic"]}), build_models=False)


def test_an_arm_that_changes_nothing_is_refused(tmp_path):
    path = write_params(tmp_path, {"ablation.arms": ["random_init"]})  # the baseline has weights: none already
    with pytest.raises(ConfigError, match=r"arm 'random_init'.*changes nothing"):
        ablation.plan("classification", path, build_models=False)


def test_an_arm_with_a_side_effect_is_refused():
    with pytest.raises(ConfigError, match=r"arm 'lr'.*not one change.*train\.epochs"):
        ablation.check_one_change(
            "lr", {"train.optimizer.lr": 0.1}, {"train.optimizer.lr": (0.003, 0.1), "train.epochs": (20, 10)}
        )
    ablation.check_one_change(
        "sgd_block", {"train.optimizer": {"name": "sgd", "momentum": 0.8}}, {"train.optimizer.name": ("adamw", "sgd")}
    )  # a section change names the keys under it


def test_ablation_baseline_may_not_switch_an_augmentation_back_on(tmp_path):
    path = write_params(tmp_path, {"ablation.baseline": {"augment.hflip.enabled": True}})
    with pytest.raises(ConfigError, match=r"baseline .* augmentations on: \['hflip'\]"):
        ablation.plan("classification", path, build_models=False)


def test_comparison_diff_is_the_switched_on_augmentations():
    """What comparison.md, the Prefect artifact and the MLflow parent run state for baseline vs augmented."""
    from cv_models.settings import diff_markdown, settings_diff

    cfg = load_params(REPO / "params.yaml").task("detection")
    diff = settings_diff(cfg.without_augmentation(), cfg)
    assert diff == {f"augment.{n}.enabled": (False, True) for n in ("color", "hflip", "mixup", "mosaic", "vflip")}
    assert "| `augment.mosaic.enabled` | False | True |" in diff_markdown(diff, "baseline", "augmented")


def test_table_states_each_arms_settings_diff(tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    path = write_params(tmp_path, {"ablation.arms": ["hflip", "label_smoothing"], "ablation.seeds": 2})
    p = ablation.plan("classification", path, build_models=False)
    results = [{"test_accuracy": 0.5 + 0.01 * i} for i in range(len(p.arms))]
    _, metrics, markdown = ablation.summarise(p, results)
    assert "| baseline | 2 |" in markdown and "every augmentation off" in markdown
    assert "`augment.hflip.enabled: False -> True`" in markdown
    assert "`train.loss.label_smoothing: 0.0 -> 0.1`" in markdown
    saved = json.loads((p.out_dir / "metrics.json").read_text())
    assert saved["settings_changed"]["hflip"] == {"augment.hflip.enabled": [False, True]}
    assert metrics == saved


def test_a_write_that_raced_another_arm_is_retried_and_other_errors_are_not():
    """Two arms logging the same dataset at once: MLflow checks, then inserts, so one insert can hit the other's
    row (seen in CI as ``UNIQUE constraint failed: datasets...``); the retry finds the row and goes on."""
    from mlflow.exceptions import MlflowException

    from tasks.runners.experiments import retry_locked

    calls = []

    def log_inputs():
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, "
                "datasets.digest"
            )
        return "logged"

    assert retry_locked(log_inputs) == "logged" and len(calls) == 2

    def broken():
        calls.append(1)
        raise MlflowException("UNIQUE constraint failed: runs.run_uuid")

    calls.clear()
    with pytest.raises(MlflowException):
        retry_locked(broken)
    assert len(calls) == 1
