"""Augmentations from params, built with torchvision transforms v2.

v2 transforms move masks (``tv_tensors.Mask``) and boxes (``tv_tensors.BoundingBoxes``)
together with the image, so one registry serves every task. Each entry turns one
``augment.<name>`` section of params.yaml into a transform; a task may swap an entry
(for example detection uses an IoU crop instead of a resized crop) by passing
``overrides``. Adding an augmentation means adding one function here and one
field to :class:`tasks.config.AugmentConfig`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import PIL.Image

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from tasks.config import AugmentConfig

Builder = Callable[..., v2.Transform]
# Order matters: geometry on uint8 images, then colour, then float conversion, noise,
# normalisation and finally obstruction (so the erased patch is 0 after normalising).
GEOMETRIC = ("hflip", "vflip", "rotation", "crop", "rescale")
PHOTOMETRIC = ("color", "blur")
AFTER_FLOAT = ("noise",)
AFTER_NORMALIZE = ("cutout",)


def _random_apply(t: v2.Transform, p: float) -> v2.Transform:
    return t if p >= 1 else v2.RandomApply([t], p=p)


AUGMENTATIONS: dict[str, Builder] = {
    "hflip": lambda c, size: v2.RandomHorizontalFlip(p=c.p),
    "vflip": lambda c, size: v2.RandomVerticalFlip(p=c.p),
    "rotation": lambda c, size: _random_apply(v2.RandomRotation(degrees=c.degrees, fill={tv_tensors.Image: c.fill, "others": 0}), c.p),
    "crop": lambda c, size: _random_apply(v2.RandomResizedCrop(size=(size, size), scale=tuple(c.scale), antialias=True), c.p),
    "rescale": lambda c, size: _random_apply(v2.RandomAffine(degrees=0, scale=tuple(c.scale)), c.p),
    "color": lambda c, size: _random_apply(
        v2.ColorJitter(brightness=c.brightness, contrast=c.contrast, saturation=c.saturation, hue=c.hue), c.p
    ),
    "blur": lambda c, size: _random_apply(v2.GaussianBlur(kernel_size=c.kernel_size, sigma=tuple(c.sigma)), c.p),
    "noise": lambda c, size: _random_apply(v2.GaussianNoise(sigma=c.sigma, clip=False), c.p),
    "cutout": lambda c, size: v2.RandomErasing(p=c.p, scale=tuple(c.scale), value=0),
}


class ToFloatImage(v2.Transform):
    """PIL image -> float ``tv_tensors.Image`` in [0, 1] in one step (masks and boxes pass through).

    Used when nothing runs between the conversion and the scaling (baseline and evaluation), where the
    per-call overhead of ToImage + ToDtype is a measurable part of a small model's training step."""

    _transformed_types = (PIL.Image.Image,)

    def transform(self, inpt, params):
        array = np.asarray(inpt.convert("RGB") if inpt.mode != "RGB" else inpt)
        return tv_tensors.Image(torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255))


def build_transforms(
    image_size: int,
    augment: AugmentConfig | None,
    normalize: Callable | None,
    resize: v2.Transform | None = None,
    overrides: dict[str, Builder] | None = None,
    tail: list[v2.Transform] | None = None,
) -> v2.Compose:
    """The whole per-sample pipeline: resize, augmentations (if any), float, normalise, cutout."""
    builders = {**AUGMENTATIONS, **(overrides or {})}

    def stage(names: tuple[str, ...]) -> list[v2.Transform]:
        if augment is None:
            return []
        return [builders[n](getattr(augment, n), image_size) for n in names if getattr(augment, n).enabled]

    # resize first: on a PIL image v2 uses PIL's fast resampling, then convert to a tensor image
    steps: list = [resize if resize is not None else v2.Resize((image_size, image_size), antialias=True)]
    middle = stage(GEOMETRIC) + stage(PHOTOMETRIC)
    if middle:
        steps += [v2.ToImage(), *middle, v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)]
    else:
        steps.append(ToFloatImage())
    steps += stage(AFTER_FLOAT)
    if normalize is not None:
        steps.append(normalize)
    steps += stage(AFTER_NORMALIZE)
    steps += tail or []
    return v2.Compose(steps)
