"""The overfit-one-batch check judges relative progress (issue 12): it passes on healthy code whatever
the loss's scale, and fails on a broken pipeline (labels detached from images, no learning)."""

import pytest
import torch

from cv_models import get_task
from tasks.baseline import overfit_verdict, run_overfit_check
from tasks.config import OverfitCheckConfig, load_params
from tasks.training import engine


def _setup(project, **overrides):
    cfg = load_params(
        project.params(**{f"tasks.classification.overfit_check.{k}": v for k, v in overrides.items()})
    ).task("classification")
    return get_task("classification", cfg), cfg


def test_verdict_is_relative_to_the_first_loss():
    c = OverfitCheckConfig(max_loss_ratio=0.5)
    assert overfit_verdict([4.0, 3.0, 2.5, 1.9, 1.95], c)[0]  # 1.9 <= 0.5 * 4.0, though far above any absolute 0.05
    assert not overfit_verdict([4.0, 3.5, 3.0, 2.5, 2.1], c)[0]
    assert overfit_verdict([4.0, 3.5, 3.0, 2.5, 2.1], OverfitCheckConfig(max_loss_ratio=0.5, max_loss=2.2))[0]


def test_healthy_pipeline_passes_and_stops_early(project):
    task, cfg = _setup(project, steps=60)
    result = run_overfit_check(task, cfg, 0, None, "classification")
    assert result["final_loss"] <= 0.5 * result["first_loss"]
    assert result["steps"] < 60  # stopped once it passed


def test_zero_learning_rate_fails(project):
    task, cfg = _setup(project, lr=1e-12, steps=20)
    with pytest.raises(engine.OverfitCheckFailed, match="cannot fit even a single batch"):
        run_overfit_check(task, cfg, 0, None, "classification")


def test_shuffled_labels_fail(project, monkeypatch):
    """A loader bug that pairs images with random labels at every step: nothing to fit."""
    task, cfg = _setup(project, steps=40)
    healthy = task.training_loss
    gen = torch.Generator().manual_seed(0)

    def shuffled(model, images, targets):
        return healthy(model, images, torch.randint(0, len(task.class_names()), targets.shape, generator=gen))

    monkeypatch.setattr(task, "training_loss", shuffled)
    with pytest.raises(engine.OverfitCheckFailed):
        run_overfit_check(task, cfg, 0, None, "classification")


def test_stratified_subset_covers_every_class():
    labels = [0] * 77 + [1] * 40 + [2] * 10  # sorted by class, as an ImageFolder listing is
    picked = engine.stratified_indices(labels, 20, seed=0)
    assert len(picked) == 20 and len(set(picked)) == 20
    counts = {y: sum(labels[i] == y for i in picked) for y in (0, 1, 2)}
    assert counts[0] >= 10 and counts[1] >= 5 and counts[2] >= 1
    assert picked == engine.stratified_indices(labels, 20, seed=0)  # seeded
    assert picked != engine.stratified_indices(labels, 20, seed=1)
    assert len(engine.stratified_indices(None, 5, seed=0, size=30)) == 5


def test_silent_failure_lines():
    healthy = engine.silent_failure_warnings({"miou": 0.6, "predicted_classes": 3}, {"miou": 0.2}, "miou", 3, "val")
    assert healthy == []
    collapsed = engine.silent_failure_warnings({"miou": 0.205, "predicted_classes": 1}, {"miou": 0.2}, "miou", 3, "val")
    assert len(collapsed) == 2 and "dummy solution's level" in collapsed[0] and "single class" in collapsed[1]


def test_training_that_learns_nothing_warns(project):
    import json
    from pathlib import Path

    from tasks import baseline, normstats

    params = project.params(
        **{
            "tasks.classification.train.optimizer.lr": 1e-9,
            "tasks.classification.train.epochs": 1,
            "tasks.classification.overfit_check.enabled": False,
        }
    )
    normstats.run("classification", params)
    with pytest.warns(engine.SilentFailureWarning, match="dummy solution's level"):
        baseline.run("classification", params)
    metrics = json.loads(Path("outputs/classification/baseline/metrics.json").read_text())
    assert any("dummy solution's level" in w for w in metrics["warnings"])


def test_detection_healthy_passes(project):
    from tests.detection_helpers import det_params

    params = det_params(
        project,
        **{
            "tasks.detection.overfit_check.steps": 60,
            "tasks.detection.overfit_check.max_loss": None,
            "tasks.detection.normalization": "none",
        },
    )
    cfg = load_params(params).task("detection")
    result = run_overfit_check(get_task("detection", cfg), cfg, 0, None, "detection")
    assert result["final_loss"] <= cfg.overfit_check.max_loss_ratio * result["first_loss"]
