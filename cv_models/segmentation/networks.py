"""The segmentation networks: :data:`ARCHITECTURES`, one entry per ``model.name`` (a U-Net written here, the U-Net
decoder on a timm encoder, torchvision's FCN / DeepLabV3 / LRASPP), the weights they start from, and their outputs
reduced to the logits. Adding a network is one entry of :data:`ARCHITECTURES`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cv_models.nets import NETS
from cv_models.nets.timm_fpn import HEADS
from cv_models.nets.timm_unet import encoder_unet
from cv_models.segmentation.settings import SegmentationModelOptions
from cv_models.settings import ModelConfig
from cv_models.weights import freeze, load_into, read_checkpoint, torchvision_state_dict


@dataclass
class Architecture:
    build: Callable[[int, object], nn.Module]  # (num_classes, ModelConfig) -> model
    head_prefixes: tuple[str, ...]  # re-fitted when weights come from another class count
    backbone_prefixes: tuple[str, ...]  # frozen by model.freeze_backbone
    # the network whose ImageNet weights model.weights: imagenet loads into the model's `encoder` (None: none)
    pretrained: Callable[[object], str | None] = lambda m: None


def _torchvision_builder(name: str, aux: bool):
    def build(num_classes: int, m) -> nn.Module:
        from torchvision.models import get_model

        o: SegmentationModelOptions = m.options
        # no ImageNet download unless asked for (model.options.weights_backbone: DEFAULT | IMAGENET1K_V1 ...)
        kwargs = {"weights": None, "weights_backbone": o.weights_backbone, "num_classes": num_classes}
        # or the trunk of a classifier checkpoint of the same family (the pretraining stage's models/pretrain/backbone.pt)
        backbone_file = o.backbone_weights
        if aux:
            kwargs["aux_loss"] = o.aux_loss
        elif o.aux_loss:
            raise ValueError(f"model.options.aux_loss: {name} has no auxiliary head")
        model = get_model(name, **kwargs, **o.kwargs)
        if backbone_file != "none":
            from cv_models.weights import load_backbone

            # torchvision wraps mobilenet's `features` (keys features.N...) and a resnet's layers directly
            load_backbone(model.backbone, backbone_file, strip_prefix="features." if "mobilenet" in name else "")
        return model

    return build


ARCHITECTURES: dict[str, Architecture] = {
    "unet": Architecture(
        lambda n, m: NETS["unet"](num_classes=n, width=m.width, depth=m.depth, dropout=m.dropout),
        ("head.",),
        ("encoder.",),
    ),
    # the U-Net decoder (ConvTranspose up) on a timm encoder's feature maps (cv_models/nets/timm_unet.py)
    "timm_unet": Architecture(
        lambda n, m: encoder_unet(m.options.encoder, n, width=m.width, dropout=m.dropout),
        ("head.",),
        ("encoder.",),
        pretrained=lambda m: m.options.encoder,
    ),
    # timm_fpn, timm_deeplab: torchvision's FPN or ASPP (DeepLabV3+) on a timm encoder (cv_models/nets/timm_fpn.py)
    **{
        name: Architecture(
            lambda n, m, build=build: build(m.options.encoder, n, width=m.width),
            ("head.",),
            ("encoder.",),
            pretrained=lambda m: m.options.encoder,
        )
        for name, build in HEADS.items()
    },
    **{
        name: Architecture(_torchvision_builder(name, aux=True), ("classifier.4.", "aux_classifier.4."), ("backbone.",))
        for name in (
            "fcn_resnet50",
            "fcn_resnet101",
            "deeplabv3_resnet50",
            "deeplabv3_resnet101",
            "deeplabv3_mobilenet_v3_large",
        )
    },
    "lraspp_mobilenet_v3_large": Architecture(
        _torchvision_builder("lraspp_mobilenet_v3_large", aux=False),
        ("classifier.low_classifier.", "classifier.high_classifier."),
        ("backbone.",),
    ),
}


def architecture(m: ModelConfig) -> Architecture:
    """The registry's entry for ``model.name``; an error naming the choices if there is none, or if the U-Net is
    given options only torchvision's models take."""
    if m.name not in ARCHITECTURES:
        raise ValueError(f"model.name {m.name!r} is not a segmentation model; choose one of {sorted(ARCHITECTURES)}")
    if m.name == "unet" and m.options != SegmentationModelOptions():
        raise ValueError(
            "model.options are for torchvision segmentation models; the unet takes width, depth and dropout"
        )
    return ARCHITECTURES[m.name]


def load_weights(
    model: nn.Module, m: ModelConfig, arch: Architecture, load_imagenet: Callable[[nn.Module], None]
) -> nn.Module:
    """``model`` from ``model.weights`` (imagenet: its encoder, via ``load_imagenet``; torchvision:<weights>; a
    checkpoint; none), then frozen as ``model.freeze_backbone`` and ``model.frozen_layers`` say."""
    if m.weights == "imagenet":
        load_imagenet(model.encoder)
    elif m.weights.startswith("torchvision:"):
        load_into(model, torchvision_state_dict(m.name, m.weights.split(":", 1)[1]), m.weights, arch.head_prefixes)
    elif m.weights != "none":
        load_into(model, read_checkpoint(m.weights), m.weights, arch.head_prefixes)
    if m.freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad = not name.startswith(arch.backbone_prefixes)
    freeze(model, m.frozen_layers)
    return model


def model_outputs(output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torchvision's models return ``{"out", "aux"}``; ours a tensor."""
    if isinstance(output, dict):
        return output["out"], output.get("aux")
    return output, None


class LogitsOnly(nn.Module):
    """torchvision's ``{"out", "aux"}`` dict reduced to the logits tensor, for export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out["out"] if isinstance(out, dict) else out


def to_size(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x C logits resized (bilinear) to ``size`` (h, w): the prediction at an image's own resolution is their argmax."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits
