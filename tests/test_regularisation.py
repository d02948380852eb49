"""Regularisation and the overfitting diagnosis (issue: training craft)."""
from pathlib import Path

import pandas as pd
import torch

from cv_models import get_task
from cv_models.normalize import load_normalizer
from tasks import engine, normstats
from tasks.config import OptimizerConfig, load_params


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
    cfg, task, norm = _setup(project, epochs=20, scheduler={"name": "none"}, optimizer={"name": "sgd", "lr": 1e-12},
                             early_stopping={"enabled": True, "patience": 2})
    train = task.dataset("train", task.eval_transforms(norm))
    result = engine.fit(task, task.build_model(), train, task.dataset("val", task.eval_transforms(norm)), cfg.train, 0,
                        Path("m.pt"))
    assert len(result.history) == 3 and result.best_epoch == 1


def test_time_limit_stops_before_an_epoch_that_would_overrun(project, capsys):
    cfg, task, norm = _setup(project, epochs=50, time_limit_minutes=1e-6)
    data = task.dataset("val", task.eval_transforms(norm))
    result = engine.fit(task, task.build_model(), data, data, cfg.train, 0, Path("m.pt"))
    assert len(result.history) == 1 and Path("m.pt").exists()
    assert "time limit: stopping after epoch 1 of 50" in capsys.readouterr().out


def test_ema_and_gradient_clipping_train(project):
    cfg, task, norm = _setup(project, epochs=2, ema_decay=0.9, grad_clip_norm=1.0)
    data = task.dataset("val", task.eval_transforms(norm))
    result = engine.fit(task, task.build_model(), data, data, cfg.train, 0, Path("m.pt"), Path("last.pt"))
    assert len(result.history) == 2 and Path("m.pt").exists()


def test_overfitting_line_names_the_epoch(project):
    # a tiny train set (16 images), no augmentation, many epochs: train accuracy -> 1, validation stalls
    cfg, task, norm = _setup(project, epochs=12, batch_size=8, optimizer={"name": "adamw", "lr": 0.003},
                             scheduler={"name": "none"})
    train = torch.utils.data.Subset(task.dataset("train", task.eval_transforms(norm)), range(16))
    val = task.dataset("val", task.eval_transforms(norm))
    result = engine.fit(task, task.build_model(), train, val, cfg.train, 0, Path("m.pt"), train_eval_set=train)
    line = engine.diagnose_overfitting(result.history, "accuracy")
    assert line is not None and line.startswith("overfitting from epoch ")
    start = int(line.split("epoch ")[1].split(":")[0])
    assert start == result.best_epoch + 1
    assert result.history["train_accuracy"].iloc[-1] > result.history["val_accuracy"].iloc[-1] + 0.2


def test_no_overfitting_line_while_validation_improves():
    history = pd.DataFrame({"epoch": [1, 2, 3, 4], "train_accuracy": [0.5, 0.7, 0.9, 1.0], "val_accuracy": [0.4, 0.5, 0.6, 0.7]})
    assert engine.diagnose_overfitting(history, "accuracy") is None
    flat = history.assign(val_accuracy=[0.4, 0.6, 0.6, 0.59])
    assert engine.diagnose_overfitting(flat, "accuracy").startswith("overfitting from epoch 3")


def test_inference_speed(project):
    cfg, task, norm = _setup(project)
    loader = engine.make_loader(task, task.dataset("test", task.eval_transforms(norm)), 16, False, 0)
    speed = engine.measure_speed(task.build_model(), loader, torch.device("cpu"))
    assert speed["images_per_second"] > 0 and speed["latency_ms"] > 0


def test_pretrained_backbone_initialises_a_classifier_and_freezes_layers(project):
    from tasks import pretrain

    overrides = {"pretrain.epochs": 1}
    params = project.params(**overrides)
    pretrain.run(params)
    saved = torch.load("models/pretrain/backbone.pt", weights_only=True)
    assert saved["architecture"] == "resnet18"
    fine_tune = project.params(**overrides, **{"tasks.classification.model.name": "resnet18",
                                               "tasks.classification.model.weights": "models/pretrain/backbone.pt",
                                               "tasks.classification.model.frozen_layers": ["conv1", "bn1", "layer1"]})
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
