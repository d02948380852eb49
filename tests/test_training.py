import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from cv_models import get_task
from cv_models.weights import WeightsError
from tasks import baseline, normstats
from tasks.config import load_params
from tasks.training import engine


def _metrics(stage="baseline"):
    return json.loads(Path(f"outputs/classification/{stage}/metrics.json").read_text())


def _history(stage="baseline"):
    return Path(f"outputs/classification/{stage}/history.csv").read_text()


def test_same_seed_same_metrics(project):
    params = project.params(**{"tasks.classification.train.epochs": 2})
    normstats.run("classification", params)
    baseline.run("classification", params)
    first, history = _metrics(), _history()
    baseline.run("classification", params)
    assert _history() == history
    assert _metrics()["val_accuracy"] == first["val_accuracy"]
    assert Path("models/classification/baseline/model.pt").exists()


def test_interrupted_training_resumes_from_last_checkpoint(project, capsys):
    params_path = project.params(**{"tasks.classification.train.epochs": 3})
    normstats.run("classification", params_path)
    cfg = load_params(params_path).task("classification")
    task = get_task("classification", cfg)
    from cv_models.normalize import load_normalizer

    norm = load_normalizer("outputs/classification/normstats", cfg.normalization)
    train, val = (
        task.dataset("train", task.train_transforms(None, norm)),
        task.dataset("val", task.eval_transforms(norm)),
    )

    def fit(model_path, ckpt, stop_at=None):
        def log(metrics, epoch):
            if epoch == stop_at:
                raise KeyboardInterrupt

        torch.manual_seed(0)
        return engine.fit(task, task.build_model(), train, val, cfg.train, 0, model_path, ckpt, log_metrics=log)

    straight = fit(Path("a/model.pt"), Path("a/last.pt"))
    with pytest.raises(KeyboardInterrupt):
        fit(Path("b/model.pt"), Path("b/last.pt"), stop_at=2)
    assert Path("b/last.pt").exists() and not Path("b/model.pt").exists()  # nothing half-written
    resumed = fit(Path("b/model.pt"), Path("b/last.pt"))
    assert "resuming from b/last.pt after epoch 2" in capsys.readouterr().out
    assert list(resumed.history["epoch"]) == [1, 2, 3]
    assert resumed.history["val_accuracy"].tolist() == pytest.approx(straight.history["val_accuracy"].tolist())
    assert not Path("b/last.pt").exists()


def test_resume_ignores_a_checkpoint_of_other_settings(project, capsys):
    params_path = project.params(**{"tasks.classification.train.epochs": 1})
    normstats.run("classification", params_path)
    cfg = load_params(params_path).task("classification")
    task = get_task("classification", cfg)
    train = task.dataset("train", task.eval_transforms(None))
    torch.save({"fingerprint": "other"}, "last.pt")
    engine.fit(task, task.build_model(), train, train, cfg.train, 0, Path("m.pt"), Path("last.pt"))
    out = capsys.readouterr().out
    assert "resuming from last.pt after" not in out
    assert "not resuming from last.pt: it was written by an older version" in out and "starting afresh" in out


def test_overfit_check_failure_is_clear(project):
    params = project.params(
        **{"tasks.classification.overfit_check.lr": 1e-9, "tasks.classification.overfit_check.steps": 5}
    )
    normstats.run("classification", params)
    with pytest.raises(engine.OverfitCheckFailed, match="cannot fit even a single batch"):
        baseline.run("classification", params)
    assert not Path("models/classification/baseline/model.pt").exists()


def _task(project, **model):
    overrides = {f"tasks.classification.model.{k}": v for k, v in model.items()}
    return get_task("classification", load_params(project.params(**overrides)).task("classification"))


def test_weights_from_a_local_checkpoint(project, tmp_path):
    donor = _task(project).build_model()
    torch.nn.init.normal_(donor.features[0].weight)
    torch.save({"model": donor.state_dict()}, tmp_path / "donor.pt")
    model = _task(project, weights=str(tmp_path / "donor.pt"), freeze_backbone=True).build_model()
    torch.testing.assert_close(model.features[0].weight, donor.features[0].weight)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}


def test_checkpoint_of_another_model_names_the_keys(project, tmp_path):
    torch.save({"conv.weight": torch.zeros(1), "features.0.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match=r"missing keys: .*features\.1\.weight.*unexpected keys: conv\.weight"):
        _task(project, weights=str(tmp_path / "other.pt")).build_model()


def test_missing_weights_file(project):
    with pytest.raises(WeightsError, match="does not exist"):
        _task(project, weights="nowhere.pt").build_model()


def test_torchvision_weights_load_from_the_cache_without_network(project, monkeypatch):
    import torchvision

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cached = torchvision.models.resnet18(weights=None)
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    hub.mkdir(parents=True, exist_ok=True)
    file_name = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    torch.save(cached.state_dict(), hub / file_name)
    try:
        model = _task(project, name="resnet18", weights="torchvision:IMAGENET1K_V1").build_model()
        torch.testing.assert_close(model.conv1.weight, cached.conv1.weight)
        assert model.fc.out_features == 4
    finally:
        (hub / file_name).unlink()


def test_torchvision_weights_without_network_or_cache(project, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(WeightsError, match="need a network to download.*resnet18-"):
        _task(project, name="resnet18", weights="torchvision:DEFAULT").build_model()


def test_classification_metrics_match_scikit_learn(project):
    import numpy as np
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    task = _task(project)
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 3, 300))  # class 3 never predicted
    result = task._score(y_true, y_pred)
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2, 3], zero_division=0)
    assert result.metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    for column, expected in (("precision", p), ("recall", r), ("f1", f), ("support", support)):
        assert result.per_class[column].tolist() == pytest.approx(expected.tolist())
