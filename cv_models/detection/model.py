"""Model glue of the detection task: torchvision detectors built by name, pretrained weights loaded into everything
but the class-dependent head, freezing, the input statistics the detector normalises with, anchors sized to the
training boxes, and the export wrapper. The light detectors themselves are cv_models/nets/detectors.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cv_models.detection.settings import DetectionModelOptions
from cv_models.weights import freeze


class DetectionOutputs(nn.Module):
    """One image in (3 x H x W float in [0, 1], the training size), the detections of it out as plain tensors: what torchvision's
    detectors export to ONNX and TorchScript as (their documented export takes a list of images)."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, image: torch.Tensor):
        out = self.model([image])[0]
        return tuple(out[k] for k in self.keys)


def torchvision_detector(m, n: int, size: tuple[int, int], mean: list[float], std: list[float]) -> nn.Module:
    """Any torchvision detection builder by ``model.name`` (e.g. fasterrcnn_mobilenet_v3_large_fpn), random init,
    ``n`` classes with the background, its box losses weighted per box."""
    from torchvision.models import get_model

    from cv_models.nets.detectors import make_weighted

    try:
        model = get_model(
            m.name,
            weights=None,
            weights_backbone=None,
            num_classes=n,
            min_size=min(size),
            max_size=max(size),
            image_mean=mean,
            image_std=std,
            **m.options.kwargs,
        )
    except (ValueError, TypeError) as err:
        raise ValueError(f"model.name {m.name!r}: {err}") from None
    make_weighted(model)
    return model


def load_weights(model: nn.Module, m, load_imagenet: Callable[[nn.Module], None]) -> None:
    """``model.weights``: everything but the class-dependent head loads; the head is rebuilt for our classes."""
    from cv_models.nets.detectors import head_prefixes, pretrained_trunk
    from cv_models.weights import load_into, read_checkpoint, torchvision_state_dict

    heads = head_prefixes(model)
    if m.weights == "imagenet":  # ImageNet weights into the backbone's trunk (the FPN and heads are new)
        load_imagenet(pretrained_trunk(model.backbone))
    elif m.weights.startswith("torchvision:"):
        load_into(model, torchvision_state_dict(m.name, m.weights.split(":", 1)[1]), m.weights, head_prefixes=heads)
    elif m.weights != "none":
        load_into(model, read_checkpoint(m.weights), m.weights, head_prefixes=heads)


def freeze_parts(model: nn.Module, m) -> None:
    """``model.freeze_backbone`` (the backbone's trunk) and ``model.frozen_layers``."""
    if m.freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad = not name.startswith("backbone.body.")
    freeze(model, m.frozen_layers)


def normalisation_stats(mode: str, path: Path) -> tuple[list[float], list[float]]:
    """Per-channel mean and std for ``normalization: mode`` from the normstats stage's ``stats.json`` at ``path``."""
    if mode == "none":
        return [0.0] * 3, [1.0] * 3
    if mode == "mean_image":
        raise ValueError(
            "detection normalises inside the detector with per-channel statistics: set "
            "normalization to per_channel_std, per_channel_mean or none (mean_image needs one image size)"
        )
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the normstats stage first (dvc repro)")
    stats = json.loads(path.read_text())
    std = stats["per_channel_std"] if mode == "per_channel_std" else [1.0] * 3
    return list(stats["per_channel_mean"]), list(std)


def anchor_layout(name: str, options: DetectionModelOptions, auto: list[str]) -> tuple[int, int]:
    """The detector's number of anchor levels and anchor sizes per level (``scales_per_level`` or its default)."""
    from cv_models.nets.detectors import ANCHOR_LAYOUT

    if name not in ANCHOR_LAYOUT:
        raise ValueError(f"model.options {auto} 'auto' is for the detectors {sorted(ANCHOR_LAYOUT)}, not {name!r}")
    levels, default_scales = ANCHOR_LAYOUT[name]
    return levels, options.scales_per_level or default_scales


def train_box_sizes(records: list[dict], image_hw: tuple[int, int]) -> torch.Tensor:
    """Every training box's (width, height) at the training size."""
    h, w = image_hw
    sizes = [
        (r["boxes"][:, 2:] - r["boxes"][:, :2]) * torch.tensor([w / r["width"], h / r["height"]])
        for r in records
        if len(r["boxes"])
    ]
    return torch.cat(sizes) if sizes else torch.zeros((0, 2))


def fitted_anchors(sizes: torch.Tensor, levels: int, scales: int) -> dict:
    """Anchor size and aspect ratios fitted to the box sizes, with their mean best IoU and recall at IoU 0.5."""
    from cv_models.nets.detectors import anchors_sized_to

    return anchors_sized_to(sizes, levels, scales)


def anchor_fit_line(
    task: str,
    image_hw: tuple[int, int],
    options: DetectionModelOptions,
    fitted: dict,
    sizes: torch.Tensor,
    levels: int,
    scales: int,
) -> str:
    """The anchors sized to the boxes, stated beside how well the default anchors fit the same boxes."""
    from cv_models.nets.detectors import DEFAULT_ANCHOR_SIZE, DEFAULT_ASPECT_RATIOS, anchor_shapes, best_anchor_iou

    h, w = image_hw
    before = best_anchor_iou(sizes, anchor_shapes(DEFAULT_ANCHOR_SIZE, levels, scales, DEFAULT_ASPECT_RATIOS)).mean()
    return (
        f"[{task}] anchors sized to the training boxes at {h}x{w} px: anchor_size={options.anchor_size}, "
        f"aspect_ratios={options.aspect_ratios}; mean best-anchor IoU "
        f"{fitted['mean_best_iou']:.3f} (the defaults, {DEFAULT_ANCHOR_SIZE} px and {DEFAULT_ASPECT_RATIOS}: "
        f"{before:.3f}), boxes with a best anchor at IoU >= 0.5: {fitted['recall_at_iou_0.5']:.1%}"
    )
