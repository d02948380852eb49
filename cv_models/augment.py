"""Augmentations from params, built with torchvision transforms v2.

v2 transforms move masks (``tv_tensors.Mask``) and boxes (``tv_tensors.BoundingBoxes``)
together with the image, so one registry serves every task. Each entry of :data:`AUGMENTATIONS`
says where in the pipeline an ``augment.<name>`` section applies (its phase) and how to build it;
a task may swap an entry's builder (detection uses an IoU crop instead of a resized crop) or add
its own entries (``CVTask.augmentations``). Adding an augmentation means one registry entry (with
its phase) and one Switch field in the augment schema (:mod:`cv_models.settings`, or the task's
subclass); :func:`cv_models.base.register_task` refuses a task whose schema and registry disagree,
and the ablation baseline switches off every Switch field, so none can be forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL.Image

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from cv_models.settings import AugmentConfig, size_hw

Builder = Callable[..., v2.Transform]
# Phases, in pipeline order: geometry on uint8 images, then colour, then float conversion, noise,
# normalisation and obstruction (so the erased patch is 0 after normalising); "batch" entries are
# applied to whole batches by the task's batch_mixer (MixUp, CutMix, mosaic, copy-paste).
PHASES = ("geometric", "photometric", "after_float", "after_normalize")
BATCH = "batch"
CUTOUT_RATIO = (0.3, 3.3)  # aspect ratio range of an erased rectangle (RandomErasing's), sampled log-uniformly


@dataclass(frozen=True)
class Augmentation:
    """One registry entry: the phase it runs in and, for per-sample phases, its builder ``(settings, size) -> transform``
    (``size``: the training size as ``(height, width)``)."""

    phase: str
    build: Builder | None = None

    def __post_init__(self):
        if self.phase not in (*PHASES, BATCH):
            raise ValueError(f"augmentation phase {self.phase!r}: choose one of {(*PHASES, BATCH)}")
        if (self.phase == BATCH) != (self.build is None):
            raise ValueError("per-sample augmentations need a builder; batch ones are built by the task's batch_mixer")

    def replace(self, build: Builder) -> "Augmentation":
        return Augmentation(self.phase, build)


def cutout_rectangle(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """``(y0, x0, h, w)`` of a random rectangle as RandomErasing draws it: area uniform in ``scale`` of the
    image, aspect ratio log-uniform in :data:`CUTOUT_RATIO` (one cutout behaviour for every task)."""
    import math

    area = height * width * float(torch.empty(()).uniform_(*scale))
    aspect = float(torch.exp(torch.empty(()).uniform_(math.log(CUTOUT_RATIO[0]), math.log(CUTOUT_RATIO[1]))))
    h = min(height, max(1, int(round((area * aspect) ** 0.5))))
    w = min(width, max(1, int(round((area / aspect) ** 0.5))))
    y0, x0 = int(torch.randint(0, height - h + 1, ())), int(torch.randint(0, width - w + 1, ()))
    return y0, x0, h, w


def random_apply(t: v2.Transform, p: float) -> v2.Transform:
    return t if p >= 1 else v2.RandomApply([t], p=p)


# the augmentations of the shared schema (AugmentConfig), in their order within a phase
AUGMENTATIONS: dict[str, Augmentation] = {
    "hflip": Augmentation("geometric", lambda c, size: v2.RandomHorizontalFlip(p=c.p)),
    "vflip": Augmentation("geometric", lambda c, size: v2.RandomVerticalFlip(p=c.p)),
    "rotation": Augmentation(
        "geometric",
        lambda c, size: random_apply(
            v2.RandomRotation(degrees=c.degrees, fill={tv_tensors.Image: c.fill, "others": 0}), c.p
        ),
    ),
    "crop": Augmentation(
        "geometric",
        lambda c, size: random_apply(v2.RandomResizedCrop(size=size, scale=tuple(c.scale), antialias=True), c.p),
    ),
    "rescale": Augmentation(
        "geometric", lambda c, size: random_apply(v2.RandomAffine(degrees=0, scale=tuple(c.scale)), c.p)
    ),
    "color": Augmentation(
        "photometric",
        lambda c, size: random_apply(
            v2.ColorJitter(brightness=c.brightness, contrast=c.contrast, saturation=c.saturation, hue=c.hue), c.p
        ),
    ),
    "blur": Augmentation(
        "photometric",
        lambda c, size: random_apply(v2.GaussianBlur(kernel_size=c.kernel_size, sigma=tuple(c.sigma)), c.p),
    ),
    "noise": Augmentation(
        "after_float", lambda c, size: random_apply(v2.GaussianNoise(sigma=c.sigma, clip=False), c.p)
    ),
    "cutout": Augmentation(
        "after_normalize", lambda c, size: v2.RandomErasing(p=c.p, scale=tuple(c.scale), ratio=CUTOUT_RATIO, value=0)
    ),
    "mixup": Augmentation(BATCH),
    "cutmix": Augmentation(BATCH),
}


def with_builders(base: dict[str, Augmentation], builders: dict[str, Builder]) -> dict[str, Augmentation]:
    """``base`` with some entries' builders swapped (same phase): a task's box- or mask-aware versions."""
    unknown = sorted(set(builders) - set(base))
    if unknown:
        raise KeyError(f"no augmentation {unknown} to replace; registered: {sorted(base)}")
    return {name: aug.replace(builders[name]) if name in builders else aug for name, aug in base.items()}


class ToFloatImage(v2.Transform):
    """PIL image -> float ``tv_tensors.Image`` in [0, 1] in one step (masks and boxes pass through).

    Used when nothing runs between the conversion and the scaling (baseline and evaluation), where the
    per-call overhead of ToImage + ToDtype is a measurable part of a small model's training step."""

    _transformed_types = (PIL.Image.Image,)

    def transform(self, inpt, params):
        array = np.asarray(inpt.convert("RGB") if inpt.mode != "RGB" else inpt)
        return tv_tensors.Image(torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255))


def build_transforms(
    image_size: int | tuple[int, int],
    augment: AugmentConfig | None,
    normalize: Callable | None,
    resize: v2.Transform | None = None,
    registry: dict[str, Augmentation] | None = None,
    tail: list[v2.Transform] | None = None,
    crop: int | tuple[int, int] | None = None,
) -> v2.Compose:
    """The whole per-sample pipeline: resize, a random crop (``crop``: training on tiles), augmentations (if any),
    float, normalise, cutout.

    ``registry``: the task's augmentations (default: the shared :data:`AUGMENTATIONS`); every enabled
    Switch of ``augment`` must have an entry, so a switched-on augmentation is never skipped silently."""
    registry = registry if registry is not None else AUGMENTATIONS
    size = size_hw(image_size)  # (height, width): one number is a square
    if augment is not None:
        missing = [n for n in augment.enabled_names() if n not in registry]
        if missing:
            raise KeyError(f"augment.{missing[0]} is switched on but has no registered augmentation")

    def stage(phase: str) -> list[v2.Transform]:
        if augment is None:
            return []
        return [
            aug.build(getattr(augment, n), size)
            for n, aug in registry.items()
            if aug.phase == phase and getattr(augment, n).enabled
        ]

    # resize first: on a PIL image v2 uses PIL's fast resampling, then convert to a tensor image
    steps: list = [resize if resize is not None else v2.Resize(size, antialias=True)]
    if crop is not None:  # after the resize: data.cache keeps the whole resized image, each access cuts a new tile
        steps.append(v2.RandomCrop(size_hw(crop)))
    middle = stage("geometric") + stage("photometric")
    if middle:
        steps += [v2.ToImage(), *middle, v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)]
    else:
        steps.append(ToFloatImage())
    steps += stage("after_float")
    if normalize is not None:
        steps.append(normalize)
    steps += stage("after_normalize")
    steps += tail or []
    return v2.Compose(steps)


# test-time augmentation (options.tta): the views of an image, each a sequence of operations, "h" / "v" flipping
# the width / height and "t" swapping them; every operation is its own inverse, so a view is undone by its
# operations in reverse order
VIEWS: dict[str, tuple[tuple[str, ...], ...]] = {
    "none": ((),),
    "hflip": ((), ("h",)),
    "flips": ((), ("h",), ("v",), ("h", "v")),
    "dihedral": ((), ("h",), ("v",), ("h", "v"), ("t",), ("t", "h"), ("t", "v"), ("t", "h", "v")),
}


def apply_view(x: torch.Tensor, ops: tuple[str, ...]) -> torch.Tensor:
    """``x`` (..., H, W) flipped and transposed as ``ops`` say, in order."""
    for op in ops:
        x = x.flip(-1) if op == "h" else x.flip(-2) if op == "v" else x.transpose(-1, -2)
    return x
