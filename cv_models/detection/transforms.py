"""Box-aware augmentations: the shared registry's crop, rescale, rotation and cutout in versions that move or drop the
boxes with the image, the training transforms built from them, and the batch mixer (mixup, mosaic, cutmix)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from cv_models.augment import build_transforms, cutout_rectangle, with_builders
from cv_models.settings import AugmentConfig


class BoxCutout(nn.Module):
    """Erase one random rectangle (RandomErasing's sampling) and remove the boxes it mostly covers."""

    def __init__(self, p: float, scale: tuple[float, float], min_visible: float, value: float = 0.5):
        super().__init__()
        self.p, self.scale, self.min_visible, self.value = p, scale, min_visible, value

    def forward(self, image, target):
        if torch.rand(()) >= self.p:
            return image, target
        from cv_models.mix.detection import drop_covered

        _, H, W = image.shape
        y0, x0, h, w = cutout_rectangle(H, W, self.scale)
        out = image.clone()
        out[:, y0 : y0 + h, x0 : x0 + w] = self.value
        boxes = target["boxes"]
        plain = {
            "boxes": boxes.as_subclass(torch.Tensor),
            "labels": target["labels"],
            "weights": torch.ones(len(target["labels"])),
        }
        kept = drop_covered(plain, (x0, y0, x0 + w, y0 + h), self.min_visible)
        new_boxes = tv_tensors.wrap(kept["boxes"], like=boxes)
        return tv_tensors.wrap(out, like=image), {**target, "boxes": new_boxes, "labels": kept["labels"]}


def _detection_overrides(size: tuple[int, int], augment: AugmentConfig) -> dict[str, Callable]:
    """Box-aware versions of the shared registry's entries (boxes move with the image in all of them)."""
    o = augment.options
    fill = {tv_tensors.Image: o.fill, "others": 0}

    def maybe(t, p):
        return t if p >= 1 else v2.RandomApply([t], p=p)

    return {
        "crop": lambda c, s: maybe(
            v2.Compose([v2.RandomIoUCrop(min_scale=c.scale[0], max_scale=c.scale[1]), v2.Resize(s, antialias=True)]),
            c.p,
        ),
        "rescale": lambda c, s: maybe(
            v2.Compose(
                [
                    v2.RandomZoomOut(fill=fill, side_range=(1.0, max(c.scale[1], 1.0 + 1e-3)), p=1.0),
                    v2.Resize(s, antialias=True),
                ]
            ),
            c.p,
        ),
        "rotation": lambda c, s: maybe(
            v2.RandomRotation(degrees=c.degrees, fill={tv_tensors.Image: c.fill, "others": 0}), c.p
        ),
        "cutout": lambda c, s: BoxCutout(c.p, tuple(c.scale), o.cutout_min_visible),
    }


def train_transforms(size: tuple[int, int], augment: AugmentConfig | None, augmentations: dict):
    """The training transforms: ``augment``'s entries, box-aware, then boxes under a pixel dropped. Never normalised:
    the detector normalises inside."""
    registry = with_builders(augmentations, _detection_overrides(size, augment)) if augment is not None else None
    return build_transforms(size, augment, None, registry=registry, tail=[v2.SanitizeBoundingBoxes(min_size=1)])


def batch_mixer(augment: AugmentConfig | None):
    """Mixup, mosaic and cutmix on the boxes of a batch, or None when all three are off."""
    if augment is None:
        return None
    from cv_models.mix.detection import DetectionMixer

    o = augment.options
    mixer = DetectionMixer(
        mixup_p=augment.mixup.p if augment.mixup.enabled else 0.0,
        mixup_alpha=augment.mixup.alpha,
        mosaic_p=augment.mosaic.p if augment.mosaic.enabled else 0.0,
        cutmix_p=augment.cutmix.p if augment.cutmix.enabled else 0.0,
        cutmix_alpha=augment.cutmix.alpha,
        min_visible=o.min_visible,
        min_side=o.min_side,
    )
    return mixer if max(mixer.mixup_p, mixer.mosaic_p, mixer.cutmix_p) > 0 else None
