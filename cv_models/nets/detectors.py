"""Detectors sized for a CPU: torchvision's Faster R-CNN (two-stage) and RetinaNet (single-stage)
on a light FPN backbone, chosen by name from a registry.

The detectors normalise their input themselves (``GeneralizedRCNNTransform``), so they receive the
training split's per-channel mean and std instead of normalised images. ``min_size`` and ``max_size``
are the training size's shorter and longer sides, so they never rescale the already resized images again.

Boxes may carry a ``weights`` entry (MixUp for detection): the weighted heads below scale each
box's classification and regression loss by its mixing weight.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetHead, RetinaNetRegressionHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign, sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from cv_models.pretrained import split_name
from cv_models.settings import size_hw


# ------------------------------------------------------------------ settings
class DetectorOptions(Protocol):
    """What the light detectors read of ``model.options``: the task's pydantic object itself (detection's
    ``DetectionModelOptions``, instance segmentation's ``InstanceModelOptions``), its ``auto`` counts already
    sized from the data (:func:`cv_models.sizing.sized_options`) and its ``auto`` anchors resolved."""

    @property
    def backbone(self) -> str: ...
    @property
    def backbone_weights(self) -> str: ...
    @property
    def fpn_channels(self) -> int: ...
    @property
    def anchor_size(self) -> float | str: ...
    @property
    def aspect_ratios(self) -> list[float] | str: ...
    @property
    def scales_per_level(self) -> int | None: ...
    @property
    def rpn_pre_nms_top_n_train(self) -> int | str: ...
    @property
    def rpn_post_nms_top_n_train(self) -> int | str: ...
    @property
    def rpn_pre_nms_top_n_test(self) -> int | str: ...
    @property
    def rpn_post_nms_top_n_test(self) -> int | str: ...
    @property
    def rpn_batch_size_per_image(self) -> int: ...
    @property
    def box_batch_size_per_image(self) -> int: ...
    @property
    def representation_size(self) -> int: ...
    @property
    def detections_per_img(self) -> int | str: ...
    @property
    def score_thresh(self) -> float: ...


class RetinaNetOptions(DetectorOptions, Protocol):
    """RetinaNet reads its head's settings too."""

    @property
    def head_norm(self) -> bool: ...
    @property
    def box_loss(self) -> str: ...
    @property
    def topk_candidates(self) -> int: ...


# ------------------------------------------------------------------ backbones
class TinyBackbone(nn.Module):
    """Four stride-2 stages of two 3x3 conv + BN + ReLU; widths w, 2w, 4w, 8w (strides 2..16)."""

    def __init__(self, width: int = 16):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
                nn.Conv2d(chans[i + 1], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            )
            for i in range(4)
        )
        self.channels = chans[2:]  # stages 2..4 (strides 4, 8, 16) feed the FPN

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:
                out[str(i - 1)] = x
        return out


class FPNBackbone(nn.Module):
    """A body returning an ordered dict of feature maps, under a feature pyramid (what the detectors expect)."""

    def __init__(self, body: nn.Module, in_channels: list[int], fpn_channels: int):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def tiny_fpn(width: int, fpn_channels: int, weights: str) -> nn.Module:
    if weights != "none":
        raise ValueError("model.options.backbone 'tiny' has no pretrained weights; set backbone_weights: none")
    body = TinyBackbone(width)
    return FPNBackbone(body, body.channels, fpn_channels)


def resnet_fpn(name: str) -> Callable[[int, int, str], BackboneWithFPN]:
    """ResNet layers 2-4 (strides 8, 16, 32) under an FPN with ``fpn_channels`` channels (few = fast)."""

    def build(width: int, fpn_channels: int, weights: str) -> BackboneWithFPN:
        import torchvision

        tv_weights = None
        if weights.startswith("torchvision:"):
            from torchvision.models import get_model_weights

            enum = get_model_weights(name)
            key = weights.split(":", 1)[1]
            tv_weights = enum.DEFAULT if key == "DEFAULT" else enum[key]
        body = getattr(torchvision.models, name)(weights=tv_weights, norm_layer=nn.BatchNorm2d)
        if weights != "none" and tv_weights is None:  # a checkpoint file, e.g. the pretraining stage's
            from cv_models.weights import load_backbone

            load_backbone(body, weights)
        in_channels = [_stage_channels(body, layer) for layer in ("layer2", "layer3", "layer4")]
        return BackboneWithFPN(
            body,
            {"layer2": "0", "layer3": "1", "layer4": "2"},
            in_channels,
            fpn_channels,
            extra_blocks=LastLevelMaxPool(),
        )

    return build


def _stage_channels(body: nn.Module, layer: str) -> int:
    last = getattr(body, layer)[-1]
    conv = getattr(last, "conv3", None) or last.conv2
    return conv.out_channels


BACKBONES: dict[str, Callable[[int, int, str], nn.Module]] = {
    "tiny": tiny_fpn,
    "resnet18": resnet_fpn("resnet18"),
    "resnet34": resnet_fpn("resnet34"),
    "resnet50": resnet_fpn("resnet50"),
}


class TimmBody(nn.Module):
    """A timm network's ``features_only`` maps at strides 8, 16 and 32 as the ordered dict an FPN takes; ``net``
    is the pretrained network itself (what model.weights: imagenet loads)."""

    def __init__(self, name: str):
        super().__init__()
        provider, arch = split_name(name)
        self.net, self.channels, strides = provider.features(arch, (2, 3, 4))
        if strides != [8, 16, 32]:
            raise ValueError(
                f"model.options.backbone {name!r}: its last three feature maps have strides {strides}, not 8, 16, 32"
            )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return OrderedDict((str(i), f) for i, f in enumerate(self.net(x)))


def timm_fpn(name: str) -> Callable[[int, int, str], nn.Module]:
    """A timm encoder (strides 8, 16, 32) under torchvision's FeaturePyramidNetwork, as the resnets are."""

    def build(width: int, fpn_channels: int, weights: str) -> nn.Module:
        if weights != "none":
            raise ValueError(
                f"model.options.backbone {name!r}: its ImageNet weights come with model.weights: imagenet, "
                f"not model.options.backbone_weights"
            )
        body = TimmBody(name)
        return FPNBackbone(body, body.channels, fpn_channels)

    return build


# provider:<arch> backbones, built on demand (cv_models/pretrained.py PROVIDERS): model.options.backbone: timm:<arch>
BACKBONE_PROVIDERS: dict[str, Callable[[str], Callable[[int, int, str], nn.Module]]] = {"timm": timm_fpn}


def get_backbone(name: str) -> Callable[[int, int, str], nn.Module]:
    """A builder ``(width, fpn_channels, backbone_weights) -> backbone`` by name: the registry's, or a provider's."""
    provider, _, arch = name.partition(":")
    if name in BACKBONES:
        return BACKBONES[name]
    if arch and provider in BACKBONE_PROVIDERS:
        return BACKBONE_PROVIDERS[provider](name)
    raise ValueError(
        f"model.options.backbone {name!r}: choose one of {sorted(BACKBONES)} or "
        f"{' | '.join(p + ':<arch>' for p in BACKBONE_PROVIDERS)}"
    )


def pretrained_trunk(backbone: nn.Module) -> nn.Module:
    """The part of an FPN backbone that ImageNet weights fit: a timm body's network, or a torchvision resnet's layers."""
    return getattr(backbone.body, "net", backbone.body)


def backbone_network(name: str) -> str | None:
    """The network whose ImageNet weights the backbone ``name`` takes (None for the tiny one, which has none)."""
    return None if name == "tiny" else name


DEFAULT_ANCHOR_SIZE = 16
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def anchor_sizes(base_size: float, n_levels: int, scales_per_level: int) -> tuple[tuple[float, ...], ...]:
    """Per level, its anchor sizes: doubling per level from ``base_size``, x 2^(k/scales) within a level."""
    return tuple(
        tuple(base_size * 2**lvl * 2 ** (k / scales_per_level) for k in range(scales_per_level))
        for lvl in range(n_levels)
    )


def anchor_generator(
    base_size: float, n_levels: int, scales_per_level: int, aspect_ratios: tuple[float, ...] = DEFAULT_ASPECT_RATIOS
) -> AnchorGenerator:
    """``anchor_sizes`` on every level, each with ``aspect_ratios`` (height / width)."""
    return AnchorGenerator(anchor_sizes(base_size, n_levels, scales_per_level), (tuple(aspect_ratios),) * n_levels)


def anchor_shapes(base_size: float, n_levels: int, scales_per_level: int, aspect_ratios) -> torch.Tensor:
    """(width, height) of every anchor ``anchor_generator`` makes with these settings."""
    return torch.tensor(
        [
            (size / r**0.5, size * r**0.5)
            for level in anchor_sizes(base_size, n_levels, scales_per_level)
            for size in level
            for r in aspect_ratios
        ]
    )


def best_anchor_iou(box_sizes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Per box, the IoU with its best anchor when both are centred on the same point (shape only)."""
    inter = torch.minimum(box_sizes[:, None, 0], anchors[None, :, 0]) * torch.minimum(
        box_sizes[:, None, 1], anchors[None, :, 1]
    )
    union = box_sizes.prod(1)[:, None] + anchors.prod(1)[None, :] - inter
    return (inter / union).max(1).values


def anchors_sized_to(box_sizes: torch.Tensor, n_levels: int, scales_per_level: int) -> dict[str, Any]:
    """Anchors sized to the data. ``box_sizes``: the training boxes' (width, height) at the training size.

    Aspect ratios (height / width): the 10th, 50th and 90th percentiles of the boxes' own ratios, which
    also absorbs the stretch of resizing non-square images to a square. Smallest anchor: the size that
    maximises the mean IoU of every box with its best anchor (larger levels double from it), searched from
    half the smallest boxes up to the size that puts the median box on the finest level. The defaults
    (16 px, ratios 0.5/1/2) are candidates too, so the result is never worse than them: with a wide spread of
    sizes (COCO) the smallest boxes alone would pull the anchors too small. Returns the options plus that
    mean IoU and the share of boxes whose best anchor reaches IoU 0.5.
    """
    wh = box_sizes[(box_sizes > 0).all(1)].float()
    if len(wh) == 0:
        raise ValueError("anchor_size/aspect_ratios 'auto' needs training boxes, and the train split has none")
    fitted_ratios = [round(float(v), 2) for v in torch.quantile(wh[:, 1] / wh[:, 0], torch.tensor([0.1, 0.5, 0.9]))]
    side = (wh[:, 0] * wh[:, 1]).sqrt()
    smallest = float(torch.quantile(side, 0.01))

    def grid(low: float, high: float) -> list[float]:
        return torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), 33).tolist()

    # around the smallest boxes first (ties keep these), then up to the median box
    bases = grid(smallest / 2, smallest * 1.5) + grid(smallest / 2, max(smallest * 1.5, float(side.median())))
    best = None
    for ratios in (fitted_ratios, list(DEFAULT_ASPECT_RATIOS)):
        for base in bases + [float(DEFAULT_ANCHOR_SIZE)]:
            iou = best_anchor_iou(wh, anchor_shapes(base, n_levels, scales_per_level, ratios))
            if best is None or iou.mean() > best[2].mean() + 1e-6:
                best = (base, ratios, iou)
    base, ratios, iou = best
    return {
        "anchor_size": round(base, 1),
        "aspect_ratios": ratios,
        "mean_best_iou": round(float(iou.mean()), 3),
        "recall_at_iou_0.5": round(float((iou >= 0.5).float().mean()), 3),
    }


def anchors_from_options(o: DetectorOptions, n_levels: int, default_scales: int) -> AnchorGenerator:
    size, ratios = o.anchor_size, o.aspect_ratios
    if isinstance(size, str) or isinstance(ratios, str):
        key, value = ("anchor_size", size) if isinstance(size, str) else ("aspect_ratios", ratios)
        raise ValueError(
            f"model.options.{key}: {value!r} must be resolved before the model is built "
            "('auto' is supported by the detection task)"
        )
    return anchor_generator(size, n_levels, o.scales_per_level or default_scales, tuple(ratios))


# ------------------------------------------------------------- weighted losses
def _box_weights(targets: list[dict], matched_idxs: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Per matched sample: the weight of its ground-truth box (1 for background); None when no weights."""
    if not targets or "weights" not in targets[0]:
        return None
    out = []
    for t, idx in zip(targets, matched_idxs):
        w = t["weights"]
        per = w[idx.clamp(min=0)] if len(w) else torch.ones(len(idx), device=idx.device)
        out.append(torch.where(idx >= 0, per, torch.ones_like(per)))
    return out


class WeightedRoIHeads(RoIHeads):
    """Faster R-CNN box head whose classification and regression losses weigh each sampled
    proposal by the mixing weight of the box it matched (MixUp); identical otherwise."""

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training or targets is None or "weights" not in targets[0]:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        # select_training_samples clamps background matches to 0: rebuild the mask from the labels
        weights = torch.cat(
            [
                torch.where(
                    lab > 0,
                    t["weights"][m] if len(t["weights"]) else torch.ones_like(lab, dtype=torch.float),
                    torch.ones_like(lab, dtype=torch.float),
                )
                for t, m, lab in zip(targets, matched_idxs, labels)
            ]
        )
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        loss_classifier = (F.cross_entropy(class_logits, labels, reduction="none") * weights).mean()
        pos = torch.where(labels > 0)[0]
        box_regression = box_regression.reshape(box_regression.shape[0], box_regression.size(-1) // 4, 4)
        per_box = F.smooth_l1_loss(
            box_regression[pos, labels[pos]], regression_targets[pos], beta=1 / 9, reduction="none"
        )
        loss_box_reg = (per_box.sum(1) * weights[pos]).sum() / labels.numel()
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


class WeightedRetinaNetClassificationHead(RetinaNetClassificationHead):
    """Focal loss with each foreground anchor weighted by its box's mixing weight (MixUp)."""

    def compute_loss(self, targets, head_outputs, matched_idxs):
        weights = _box_weights(targets, matched_idxs)
        if weights is None:
            return super().compute_loss(targets, head_outputs, matched_idxs)
        losses = []
        for t, logits, idx, w in zip(targets, head_outputs["cls_logits"], matched_idxs, weights):
            fg = idx >= 0
            target = torch.zeros_like(logits)
            target[fg, t["labels"][idx[fg]]] = 1.0
            valid = idx != self.BETWEEN_THRESHOLDS
            per_anchor = sigmoid_focal_loss(logits[valid], target[valid], reduction="none").sum(1)
            losses.append((per_anchor * w[valid]).sum() / max(1, int(fg.sum())))
        return sum(losses) / len(targets)


# ------------------------------------------------------------------ detectors
def _common(image_size: int | tuple[int, int], mean, std) -> dict:
    h, w = size_hw(image_size)  # an h x w image scaled by min(min_size / min(h, w), max_size / max(h, w)) = 1
    return dict(min_size=min(h, w), max_size=max(h, w), image_mean=list(mean), image_std=list(std))


def proposal_settings(o: DetectorOptions) -> dict:
    """The knobs that decide CPU cost: proposals kept, RoIs sampled, detections returned."""
    return dict(
        rpn_pre_nms_top_n_train=o.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=o.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=o.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=o.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=o.rpn_batch_size_per_image,
        box_batch_size_per_image=o.box_batch_size_per_image,
        box_detections_per_img=o.detections_per_img,
        box_score_thresh=o.score_thresh,
    )


def faster_rcnn(
    num_classes: int, backbone: nn.Module, image_size: int | tuple[int, int], mean, std, o: DetectorOptions
) -> nn.Module:
    levels = ["0", "1", "2"]  # the pooled extra level only feeds the RPN
    c = backbone.out_channels
    model = FasterRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors_from_options(o, len(levels) + 1, 1),
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(c * 49, o.representation_size),
        box_predictor=FastRCNNPredictor(o.representation_size, num_classes),
        **proposal_settings(o),
        **_common(image_size, mean, std),
    )
    model.roi_heads.__class__ = WeightedRoIHeads
    return model


def retinanet(
    num_classes: int, backbone: nn.Module, image_size: int | tuple[int, int], mean, std, o: RetinaNetOptions
) -> nn.Module:
    anchors = anchors_from_options(o, 4, 2)
    c = backbone.out_channels
    n_anchors = anchors.num_anchors_per_location()[0]
    norm = (lambda ch: nn.GroupNorm(min(16, ch), ch)) if o.head_norm else None
    head = RetinaNetHead(c, n_anchors, num_classes, norm_layer=norm)
    head.classification_head = WeightedRetinaNetClassificationHead(c, n_anchors, num_classes, norm_layer=norm)
    head.regression_head = RetinaNetRegressionHead(c, n_anchors, norm_layer=norm)
    head.regression_head._loss_type = o.box_loss
    return RetinaNet(
        backbone,
        num_classes,
        anchor_generator=anchors,
        head=head,
        detections_per_img=o.detections_per_img,
        score_thresh=o.score_thresh,
        topk_candidates=o.topk_candidates,
        **_common(image_size, mean, std),
    )


# (FPN levels with anchors, default anchor sizes per level) of each detector, for anchors sized to the data
ANCHOR_LAYOUT = {"fasterrcnn": (4, 1), "retinanet": (4, 2)}

DETECTORS: dict[str, Callable[..., nn.Module]] = {
    "fasterrcnn": faster_rcnn,  # two-stage
    "retinanet": retinanet,  # single-stage
}


def make_weighted(model: nn.Module) -> nn.Module:
    """Swap torchvision's box heads for the weighted ones (same parameters, same loss without weights)."""
    if type(getattr(model, "roi_heads", None)) is RoIHeads:
        model.roi_heads.__class__ = WeightedRoIHeads
    head = getattr(getattr(model, "head", None), "classification_head", None)
    if type(head) is RetinaNetClassificationHead:
        head.__class__ = WeightedRetinaNetClassificationHead
    return model


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the class-dependent layers, which other weights may not fit."""
    names = [n for n, _ in model.named_modules()]
    wanted = (
        "roi_heads.box_predictor",
        "head.classification_head.cls_logits",
        "roi_heads.mask_predictor.mask_fcn_logits",
    )
    found = tuple(p + "." for p in wanted if p in names)
    if "head.classification_head.module_list" in names:  # SSD / SSDlite
        found += ("head.classification_head.",)
    return found


def build_detector(
    name: str, num_classes: int, image_size: int | tuple[int, int], mean, std, width: int, options: RetinaNetOptions
) -> nn.Module:
    """``num_classes`` counts the background (index 0); ``options``: the task's ``model.options`` (sized, anchors
    resolved)."""
    if name not in DETECTORS:
        raise ValueError(f"model.name {name!r} is not a detector here; choose one of {sorted(DETECTORS)}")
    backbone = get_backbone(options.backbone)(width, options.fpn_channels, options.backbone_weights)
    return DETECTORS[name](num_classes, backbone, image_size, mean, std, options)
