"""A backbone saved by the pretraining stage initialises a detector and a segmenter (weights equal after loading)."""

import torch

from cv_models import get_task
from tasks import normstats, pretrain
from tasks.config import load_params


def _pretrain(project, architecture):
    params = project.params(**{"pretrain.epochs": 1, "pretrain.model": architecture, "pretrain.batch_size": 64})
    pretrain.run(params)
    return torch.load("models/pretrain/backbone.pt", weights_only=True)["model"]


def _build(project, task, **model):
    overrides = {f"tasks.{task}.model.{k}": v for k, v in model.items()}
    return get_task(task, load_params(project.params(**overrides)).task(task)).build_model()


def test_pretrained_resnet18_initialises_a_detector(project):
    saved = _pretrain(project, "resnet18")
    normstats.run("detection", project.params())  # detectors normalise inside, with these statistics
    detector = _build(
        project,
        "detection",
        options={"backbone": "resnet18", "backbone_weights": "models/pretrain/backbone.pt", "fpn_channels": 32},
    )
    body = detector.backbone.body
    for key in ("conv1.weight", "layer2.0.conv1.weight", "layer4.1.bn2.running_mean"):
        torch.testing.assert_close(body.state_dict()[key], saved[key])


def test_pretrained_mobilenet_initialises_a_segmenter(project):
    saved = _pretrain(project, "mobilenet_v3_large")
    segmenter = _build(
        project,
        "segmentation",
        name="lraspp_mobilenet_v3_large",
        options={"backbone_weights": "models/pretrain/backbone.pt"},
    )
    own = segmenter.backbone.state_dict()
    for key in ("0.0.weight", "4.block.0.0.weight", "16.0.weight"):
        torch.testing.assert_close(own[key], saved["features." + key])


def test_pretraining_into_a_shared_folder_touches_nothing_else(project, tmp_path):
    shared = tmp_path / "weights"
    shared.mkdir()
    (shared / "keep.txt").write_text("another project's file")
    out = shared / "backbone.pt"
    pretrain.run(project.params(**{"pretrain.epochs": 1, "pretrain.batch_size": 64, "pretrain.out": str(out)}))
    assert (shared / "keep.txt").read_text() == "another project's file"
    assert sorted(p.name for p in shared.iterdir()) == ["backbone.metrics.json", "backbone.pt", "keep.txt"]
    assert torch.load(out, weights_only=True)["architecture"] == "resnet18"


def test_object_crops_of_the_train_split_pretrain_a_backbone(project):
    import json
    from pathlib import Path

    from tasks import crops

    params = project.params(**{"tasks.detection.image_size": 64, "crops.size": 32})
    summary = crops.run(params)
    train = json.loads((project.shapes / "scenes" / "annotations" / "train.json").read_text())
    names = {c["id"]: c["name"] for c in train["categories"]}
    expected = {n: sum(names[a["category_id"]] == n for a in train["annotations"]) for n in names.values()}
    assert summary["crops_per_class"] == expected  # every train box, and only the train split's
    out = Path("data/crops/detection")
    assert {p.name: len(list(p.glob("*.png"))) for p in out.iterdir()} == expected
    pretrain.run(
        project.params(
            **{
                "pretrain.data": str(out),
                "pretrain.split_from": "seed",
                "pretrain.epochs": 1,
                "pretrain.image_size": 32,
                "pretrain.batch_size": 64,
            }
        )
    )
    assert torch.load("models/pretrain/backbone.pt", weights_only=True)["pretrained_on"] == str(out)


def test_crops_of_every_class_while_the_task_keeps_one(project):
    """crops.classes: all crops every object of the train split, also the classes keep_classes leaves out
    (COCO person: the backbone learns from all 80); kept crops only what the task trains on. Instance
    segmentation's boxes crop as detection's do."""
    import json
    from pathlib import Path

    from tasks import crops

    train = json.loads((project.shapes / "scenes" / "annotations" / "train.json").read_text())
    names = {c["id"]: c["name"] for c in train["categories"]}
    every = {n: sum(names[a["category_id"]] == n for a in train["annotations"]) for n in names.values()}
    keep = sorted(every)[:1]
    base = {
        "crops.task": "instance_segmentation",
        "crops.size": 16,
        "crops.out": "data/crops/inst",
        "tasks.instance_segmentation.data.options.keep_classes": keep,
    }
    assert crops.run(project.params(**base, **{"crops.classes": "all"}))["crops_per_class"] == every
    assert {p.name: len(list(p.glob("*.png"))) for p in Path("data/crops/inst").iterdir()} == every
    assert crops.run(project.params(**base, **{"crops.classes": "kept"}))["crops_per_class"] == {
        keep[0]: every[keep[0]]
    }
    assert sorted(p.name for p in Path("data/crops/inst").iterdir()) == keep  # replaced whole
