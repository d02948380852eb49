"""data.cache (decode + resize once), train.num_workers: auto, train.val_every and the time-limit rule (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import FitHooksStub

from cv_models import get_task
from cv_models.data import cache
from cv_models.normalize import Normalize
from tasks.config import TrainConfig, load_params
from tasks.training import engine

AUGMENT = {
    "hflip": {"enabled": True},
    "crop": {"enabled": True},
    "color": {"enabled": True},
    "rotation": {"enabled": True, "p": 1.0},
    "cutout": {"enabled": True},
}


def _task(project, name, **extra):
    """The task, a normalisation (fixed statistics: the normstats stage is not what is tested) and its settings."""
    cfg = load_params(project.params(**{f"tasks.{name}.{k}": v for k, v in extra.items()})).task(name)
    return (
        get_task(name, cfg),
        Normalize("per_channel_std", torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])),
        cfg,
    )


def _same(a, b) -> bool:
    """Equal samples, bit for bit: tensors, numbers and the containers they sit in."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_ram_cache_trains_exactly_as_without(project, capsys):
    """Classification with random augmentations: the same losses and metrics, epoch by epoch, bit for bit."""
    task, norm, cfg = _task(project, "classification", augment=AUGMENT, **{"train.epochs": 2, "train.num_threads": 1})

    def few(split, transforms, n):  # a few images: this is about equality, not learning
        data = task.dataset(split, transforms)
        data.samples, data.labels = data.samples[:: len(data) // n][:n], data.labels[:: len(data) // n][:n]
        return data

    def run(mode: str) -> engine.FitResult:
        train = few("train", task.train_transforms(cfg.augment, norm), 48)
        val = few("val", task.eval_transforms(norm), 24)
        plain = few("train", task.eval_transforms(norm), 48)  # the train subset scored each epoch
        if mode == "none":
            train_eval = task.subset(plain, list(range(0, 48, 3)))
        else:
            train = cache.CachedDataset(train, mode, f"cls-train-{mode}", 1.0, label="train")
            val = cache.CachedDataset(val, mode, f"cls-val-{mode}", 1.0, label="val")
            train_eval = cache.CachedDataset(plain, mode, f"cls-train-{mode}", 1.0).subset(task, list(range(0, 48, 3)))
        torch.manual_seed(0)
        return engine.fit(
            task, task.build_model(), train, val, cfg.train, 0, Path(f"m-{mode}.pt"), train_eval_set=train_eval
        )

    plain, kept = run("none"), run("ram")
    assert "train_accuracy" in kept.history  # the cached train subset was scored too
    pd.testing.assert_frame_equal(plain.history, kept.history, check_exact=True)
    assert plain.best_metrics == kept.best_metrics
    assert "[cache] train:" in capsys.readouterr().out  # the size was said before filling


@pytest.mark.parametrize("name", ["segmentation", "detection", "instance_segmentation"])
def test_dense_targets_are_cached_with_their_images(project, name):
    """Masks, boxes and instance masks resized with the image: a cached sample under the same random draws
    equals the uncached one (geometric augmentations on, so a target out of step would differ), at a
    non-square training size (height != width: a swapped side would differ too)."""
    task, norm, cfg = _task(
        project,
        name,
        image_size=[40, 56],
        augment={"hflip": {"enabled": True}, "rotation": {"enabled": True, "p": 1.0}},
    )
    transforms = lambda: task.train_transforms(cfg.augment, norm)  # noqa: E731 - one pipeline per dataset
    plain = task.dataset("train", transforms())
    kept = cache.CachedDataset(task.dataset("train", transforms()), "ram", f"dense-{name}", 1.0)
    for i in range(3):
        torch.manual_seed(i)
        a = plain[i]
        torch.manual_seed(i)
        assert _same(a, kept[i]), f"{name} sample {i} differs with the cache"
        torch.manual_seed(i)
        assert _same(a, kept[i]), f"{name} sample {i}: the kept copy changed after use"
    assert tuple(a[0].shape[-2:]) == (40, 56)


def test_disk_cache_is_reused_and_written_whole(project, tmp_path, capsys):
    task, norm, _ = _task(project, "segmentation")
    make = lambda: task.dataset("val", task.eval_transforms(norm))  # noqa: E731
    first = cache.CachedDataset(make(), "disk", "k1", 1.0, root=tmp_path / "c")
    files = sorted((tmp_path / "c" / "k1").iterdir())
    assert [f.name for f in files] == sorted(f"{i}.pt" for i in range(len(first)))  # no .tmp left behind
    capsys.readouterr()
    again = make()
    again.load_mask = None  # a second run reads the files: neither image nor mask is decoded again
    second = cache.CachedDataset(again, "disk", "k1", 1.0, root=tmp_path / "c")
    assert "read from" in capsys.readouterr().out
    assert all(_same(first[i], second[i]) and _same(make()[i], second[i]) for i in range(len(first)))


def test_cache_over_budget_is_refused_before_filling(project):
    task, norm, _ = _task(project, "classification")
    data = task.dataset("train", task.eval_transforms(norm))
    with pytest.raises(cache.CacheTooLarge, match=r"data\.cache: ram .* over data\.cache_max_gb=1e-06"):
        cache.CachedDataset(data, "ram", "too-big", 1e-6)
    assert "too-big" not in cache._RAM


def test_num_workers_auto_follows_the_cores():
    assert engine.worker_count(TrainConfig(), cores=2) == 0
    assert engine.worker_count(TrainConfig(num_threads=1), cores=16) == 8
    assert engine.worker_count(TrainConfig(num_threads=4), cores=6) == 2
    assert engine.worker_count(TrainConfig(num_threads=0), cores=16) == 0  # torch takes every core
    assert engine.worker_count(TrainConfig(num_workers=3), cores=2) == 3


class _Counting(FitHooksStub):
    """Enough of a CVTask for engine.fit: a linear model; the validation score rises then falls."""

    name, primary_metric = "toy", "score"

    def __init__(self):
        self.cfg, self.scored = TrainConfig(), 0

    def collate(self, batch):
        return torch.utils.data.default_collate(batch)

    def training_loss(self, model, x, y):
        return ((model(x).squeeze(1) - y) ** 2).mean()

    def evaluate(self, model, loader, device):
        from cv_models.base import EvalResult

        self.scored += 1
        return EvalResult({"score": [0.5, 0.9, 0.2, 0.1][min(self.scored - 1, 3)]})

    def class_names(self):
        return []


def test_val_every_validates_some_epochs_and_the_last(tmp_path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8))
    cfg = TrainConfig(
        epochs=7, batch_size=4, val_every=3, track_train_metric=False, early_stopping={"enabled": True, "patience": 3}
    )
    task = _Counting()
    result = engine.fit(task, torch.nn.Linear(3, 1), data, data, cfg, 0, tmp_path / "m.pt")
    h = result.history
    # validated at 3 (0.5), 6 (0.9), 7 (the last, 0.2); the others have no val metric
    assert h["val_score"].notna().tolist() == [False, False, True, False, False, True, True]
    assert task.scored == 3 and result.best_epoch == 6 and result.best_metrics["score"] == 0.9
    assert engine.diagnose_overfitting(h.assign(train_score=1.0), "score", min_flat_epochs=1) is not None


def test_training_stages_cache_per_setting(project):
    """tasks/training/train.py's wiring: none passes the dataset through; ram keeps the train split once for training and the
    train-subset scoring; disk without the validate stage's data version is refused, naming what to do."""
    from types import SimpleNamespace

    from tasks.config import ConfigError
    from tasks.training.train import cached

    def stage(mode):
        task, norm, cfg = _task(project, "classification", **{"data.cache": mode})
        return SimpleNamespace(task=task, cfg=cfg, task_name="classification"), norm

    st, norm = stage("none")
    assert not isinstance(cached(st, "val", st.task.eval_transforms(norm)), cache.CachedDataset)
    st, norm = stage("ram")
    train = cached(st, "train", st.task.train_transforms(None, norm))
    plain = cached(st, "train", st.task.eval_transforms(norm))
    assert isinstance(train, cache.CachedDataset) and train.kept is plain.kept
    st, norm = stage("disk")
    with pytest.raises(ConfigError, match=r"data\.cache: disk .* validate"):
        cached(st, "val", st.task.eval_transforms(norm))
