"""Regularisation and the overfitting diagnosis (issue: training craft)."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import FitHooksStub

from cv_models import get_task
from cv_models.normalize import load_normalizer
from tasks import normstats
from tasks.config import OptimizerConfig, TrainConfig, load_params
from tasks.training import engine


def _setup(project, **train):
    params = project.params(**{f"tasks.classification.train.{k}": v for k, v in train.items()})
    normstats.run("classification", params)
    cfg = load_params(params).task("classification")
    task = get_task("classification", cfg)
    norm = load_normalizer("outputs/classification/normstats", cfg.normalization)
    return cfg, task, norm


def test_weight_decay_skips_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    groups = engine.parameter_groups(model, OptimizerConfig(weight_decay=0.1))
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model[0].weight), id(model[2].weight)}
    assert len(engine.parameter_groups(model, OptimizerConfig(decay_norms_and_biases=True))) == 1


def test_early_stopping_stops_on_a_plateau(project):
    # lr 0 after warmup-free start: the validation metric cannot improve, so training stops after `patience` epochs
    cfg, task, norm = _setup(
        project,
        epochs=20,
        scheduler={"name": "none"},
        optimizer={"name": "sgd", "lr": 1e-12},
        early_stopping={"enabled": True, "patience": 2},
    )
    train = task.dataset("train", task.eval_transforms(norm))
    result = engine.fit(
        task, task.build_model(), train, task.dataset("val", task.eval_transforms(norm)), cfg.train, 0, Path("m.pt")
    )
    assert len(result.history) == 3 and result.best_epoch == 1


def test_time_limit_stops_before_an_epoch_that_would_overrun(project, capsys):
    cfg, task, norm = _setup(project, epochs=50, time_limit_minutes=1e-6)
    data = task.dataset("val", task.eval_transforms(norm))
    result = engine.fit(task, task.build_model(), data, data, cfg.train, 0, Path("m.pt"))
    assert len(result.history) == 1 and Path("m.pt").exists()
    assert "time limit: stopping after epoch 1 of 50" in capsys.readouterr().out


class _LinearTask(FitHooksStub):
    """Just enough of a CVTask for engine.fit: a linear model, squared error; records the weights at every step."""

    name, primary_metric = "toy", "score"

    def __init__(self):
        self.seen: list[torch.Tensor] = []  # the weights each step starts from
        self.cfg = TrainConfig()

    def collate(self, batch):
        return torch.utils.data.default_collate(batch)

    def training_loss(self, model, x, y):
        self.seen.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
        return ((model(x).squeeze(1) - y) ** 2).mean() * 100  # large gradients: clipping has work to do

    def evaluate(self, model, loader, device):
        from cv_models.base import EvalResult

        return EvalResult({"score": 0.0})

    def class_names(self):
        return []


def _toy_fit(tmp_path, **train):
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randn(16)
    data = torch.utils.data.TensorDataset(x, y)
    cfg = TrainConfig(
        epochs=1,
        batch_size=4,
        track_train_metric=False,
        scheduler={"name": "none"},
        optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0},
        **train,
    )
    task, model = _LinearTask(), torch.nn.Linear(3, 1)
    engine.fit(task, model, data, data, cfg, 0, tmp_path / "m.pt")
    after = [*task.seen[1:], torch.cat([p.detach().flatten() for p in model.parameters()])]  # weights after each step
    saved = torch.load(tmp_path / "m.pt", weights_only=True)["model"]
    return task.seen, after, torch.cat([saved["weight"].flatten(), saved["bias"].flatten()])


def test_ema_weights_are_the_moving_average_of_the_steps(tmp_path):
    decay = 0.9
    _, after, saved = _toy_fit(tmp_path, ema_decay=decay)
    assert len(after) == 4  # 16 samples, batches of 4
    ema = after[0].clone()  # the average starts as a copy of the first step's weights
    for w in after[1:]:
        ema = decay * ema + (1 - decay) * w
    torch.testing.assert_close(saved, ema)  # what is saved and scored is the average...
    assert not torch.allclose(saved, after[-1])  # ...not the last weights


def test_clipping_bounds_every_step_by_the_limit(tmp_path):
    limit, lr = 0.5, 0.01
    before, after, _ = _toy_fit(tmp_path, grad_clip_norm=limit)
    steps = [float((b - a).norm()) / lr for b, a in zip(before, after)]  # plain SGD: step = lr * clipped gradient
    assert all(s <= limit * (1 + 1e-4) for s in steps), steps
    assert max(steps) > 0.99 * limit  # the raw gradients were larger: the clip was active
    _, unclipped, _ = _toy_fit(tmp_path)
    assert float((before[0] - unclipped[0]).norm()) / lr > 2 * limit


def test_overfitting_line_names_the_epoch(project):
    # a tiny train set (16 images), no augmentation, many epochs: train accuracy -> 1, validation stalls
    cfg, task, norm = _setup(
        project, epochs=12, batch_size=8, optimizer={"name": "adamw", "lr": 0.003}, scheduler={"name": "none"}
    )
    train = torch.utils.data.Subset(task.dataset("train", task.eval_transforms(norm)), range(16))
    val = task.dataset("val", task.eval_transforms(norm))
    result = engine.fit(task, task.build_model(), train, val, cfg.train, 0, Path("m.pt"), train_eval_set=train)
    line = engine.diagnose_overfitting(result.history, "accuracy")
    assert line is not None and line.startswith("overfitting from epoch ")
    start = int(line.split("epoch ")[1].split(":")[0])
    assert start == result.best_epoch + 1
    assert result.history["train_accuracy"].iloc[-1] > result.history["val_accuracy"].iloc[-1] + 0.2


def test_no_overfitting_line_while_validation_improves():
    history = pd.DataFrame(
        {"epoch": [1, 2, 3, 4], "train_accuracy": [0.5, 0.7, 0.9, 1.0], "val_accuracy": [0.4, 0.5, 0.6, 0.7]}
    )
    assert engine.diagnose_overfitting(history, "accuracy") is None
    flat = history.assign(val_accuracy=[0.4, 0.6, 0.6, 0.59])
    assert engine.diagnose_overfitting(flat, "accuracy").startswith("overfitting from epoch 3")


def test_inference_speed_measures_the_model_time(monkeypatch):
    """A model that takes exactly 20 ms per call on a clock that only the model advances: throughput and latency
    must come out as exactly that (no wall-clock bounds, so a busy machine cannot fail it)."""
    import time

    clock = [1000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    class Slow(torch.nn.Module):
        def forward(self, x):
            clock[0] += 0.02
            return x.mean(dim=(1, 2, 3))

    data = torch.utils.data.TensorDataset(torch.zeros(64, 3, 8, 8), torch.zeros(64))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    speed = engine.measure_speed(Slow(), loader, torch.device("cpu"), latency_repeats=5)
    assert speed["latency_ms"] == pytest.approx(20)  # one image: one call
    assert speed["images_per_second"] == pytest.approx(16 / 0.02)  # a batch of 16 per 20 ms call


def test_pretrained_backbone_initialises_a_classifier_and_freezes_layers(project):
    from tasks import pretrain

    overrides = {"pretrain.epochs": 1}
    params = project.params(**overrides)
    pretrain.run(params)
    saved = torch.load("models/pretrain/backbone.pt", weights_only=True)
    assert saved["architecture"] == "resnet18"
    fine_tune = project.params(
        **overrides,
        **{
            "tasks.classification.model.name": "resnet18",
            "tasks.classification.model.weights": "models/pretrain/backbone.pt",
            "tasks.classification.model.frozen_layers": ["conv1", "bn1", "layer1"],
        },
    )
    model = get_task("classification", load_params(fine_tune).task("classification")).build_model()
    torch.testing.assert_close(model.layer3[0].conv1.weight, saved["model"]["layer3.0.conv1.weight"])
    assert not model.layer1[0].conv1.weight.requires_grad and model.layer2[0].conv1.weight.requires_grad


def test_backbone_loader_names_keys(tmp_path):
    import torchvision

    from cv_models.weights import WeightsError, load_backbone

    torch.save({"model": torchvision.models.resnet18().state_dict()}, tmp_path / "r18.pt")
    body = torchvision.models.resnet18()
    del body.fc
    load_backbone(body, tmp_path / "r18.pt")  # fits: only the head is dropped
    try:
        load_backbone(torchvision.models.resnet34(), tmp_path / "r18.pt")
    except WeightsError as err:
        assert "missing keys: " in str(err) and "layer1.2" in str(err)
    else:
        raise AssertionError("a resnet18 checkpoint must not load into a resnet34")
