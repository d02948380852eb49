"""Mask R-CNN sized for a CPU, chosen by name from a registry.

* ``maskrcnn``: torchvision's :class:`MaskRCNN` on a light FPN backbone from the detection
  registry (``model.options.backbone``: tiny | resnet18 | resnet34 | resnet50), few FPN channels,
  small box and mask heads and few proposals. Random init unless
  ``model.options.backbone_weights: torchvision:DEFAULT`` (ImageNet backbone, needs the file cached).
* ``maskrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn_v2``: torchvision's full models; with
  ``model.weights: torchvision:DEFAULT`` the COCO weights are loaded and both the box and the mask
  predictor are replaced to fit the dataset's classes.

Images arrive already resized to ``image_size`` and normalised by the pipeline, so the model's own
transform neither rescales (``min_size`` / ``max_size``: the shorter / longer side of ``image_size``) nor
normalises (mean 0, std 1).
"""

from __future__ import annotations

from typing import Callable, Protocol

from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from cv_models.nets.detectors import DetectorOptions, anchors_from_options, get_backbone, proposal_settings
from cv_models.settings import size_hw

# class-dependent tensors: skipped when loading weights made for another class list
HEAD_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.")


class MaskRCNNOptions(DetectorOptions, Protocol):
    """What the Mask R-CNNs read of ``model.options``: instance segmentation's ``InstanceModelOptions`` itself,
    its ``auto`` counts already sized from the data (:func:`cv_models.sizing.sized_options`)."""

    @property
    def mask_head_layers(self) -> int: ...
    @property
    def mask_head_channels(self) -> int | None: ...


def _no_rescale(image_size: int | tuple[int, int]) -> dict:
    h, w = size_hw(image_size)  # an h x w image is then scaled by 1
    return dict(min_size=min(h, w), max_size=max(h, w), image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])


def light_mask_rcnn(num_classes: int, image_size: int | tuple[int, int], width: int, o: MaskRCNNOptions) -> nn.Module:
    backbone = get_backbone(o.backbone)(width, o.fpn_channels, o.backbone_weights)
    c = backbone.out_channels
    levels = ["0", "1", "2"]  # the pooled extra level only feeds the RPN
    head_size = o.representation_size
    mask_channels = o.mask_head_channels or c
    mask_layers = o.mask_head_layers
    return MaskRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors_from_options(o, len(levels) + 1, 1),
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(c * 49, head_size),
        box_predictor=FastRCNNPredictor(head_size, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(c, [mask_channels] * mask_layers, dilation=1),
        mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes),
        **proposal_settings(o),
        **_no_rescale(image_size),
    )


def torchvision_mask_rcnn(name: str) -> Callable[..., nn.Module]:
    """torchvision's ResNet-50 Mask R-CNN (built without weights; the caller loads any)."""

    def build(num_classes: int, image_size: int | tuple[int, int], width: int, o: MaskRCNNOptions) -> nn.Module:
        from torchvision.models import get_model

        return get_model(
            name,
            weights=None,
            weights_backbone=None,
            num_classes=num_classes,
            **proposal_settings(o),
            **_no_rescale(image_size),
        )

    return build


MASK_RCNNS: dict[str, Callable[[int, int | tuple[int, int], int, MaskRCNNOptions], nn.Module]] = {
    "maskrcnn": light_mask_rcnn,
    "maskrcnn_resnet50_fpn": torchvision_mask_rcnn("maskrcnn_resnet50_fpn"),
    "maskrcnn_resnet50_fpn_v2": torchvision_mask_rcnn("maskrcnn_resnet50_fpn_v2"),
}


def replace_predictors(model: MaskRCNN, num_classes: int) -> MaskRCNN:
    """New box and mask predictors for ``num_classes`` (background included), keeping their input widths."""
    box_in = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(box_in, num_classes)
    mask_in = model.roi_heads.mask_predictor.conv5_mask.in_channels
    hidden = model.roi_heads.mask_predictor.conv5_mask.out_channels
    model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_in, hidden, num_classes)
    return model


def build_mask_rcnn(
    name: str,
    num_classes: int,
    image_size: int | tuple[int, int],
    width: int,
    options: MaskRCNNOptions,
    weights: str = "none",
) -> nn.Module:
    """``num_classes`` counts the background (index 0). ``options``: the task's ``model.options`` (sized).
    ``weights``: none | torchvision:NAME | checkpoint path."""
    if name not in MASK_RCNNS:
        raise ValueError(
            f"model.name {name!r} is not an instance-segmentation model; choose one of {sorted(MASK_RCNNS)}"
        )
    if weights.startswith("torchvision:"):
        from cv_models.weights import load_into, torchvision_state_dict

        if name == "maskrcnn":
            raise ValueError(
                "model.name 'maskrcnn' has no whole-model torchvision weights; use "
                "model.options.backbone_weights for an ImageNet backbone, or maskrcnn_resnet50_fpn"
            )
        model = MASK_RCNNS[name](91, image_size, width, options)  # COCO's 91 categories, as the weights have
        load_into(model, torchvision_state_dict(name, weights.split(":", 1)[1]), weights)
        return replace_predictors(model, num_classes)
    model = MASK_RCNNS[name](num_classes, image_size, width, options)
    if weights != "none":
        from cv_models.weights import load_into, read_checkpoint

        load_into(model, read_checkpoint(weights), weights, head_prefixes=HEAD_PREFIXES)
    return model
