"""MixUp and CutMix for semantic segmentation (torchvision's v2 versions handle class labels only).

Both pair each image with the next one in the batch (``roll(1)``, as torchvision does) and draw
the mixing weight ``lam`` from Beta(alpha, alpha).

* CutMix pastes a rectangle of the partner image; the partner's mask comes with it, so every pixel
  keeps the label of the image it came from (hard targets stay hard).
* MixUp blends whole images; the target becomes per-pixel soft labels ``lam * one_hot(a) +
  (1 - lam) * one_hot(b)`` (ignored pixels contribute zeros), which the losses in
  :mod:`cv_models.seg_losses` accept.
"""

from __future__ import annotations

import math

import torch

from cv_models.seg_losses import soft_targets


class _Mixer:
    def __init__(self, alpha: float, num_classes: int, ignore_index: int):
        self.beta = torch.distributions.Beta(torch.tensor([float(alpha)]), torch.tensor([float(alpha)]))
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def lam(self) -> float:
        return float(self.beta.sample())


class SegmentationCutMix(_Mixer):
    def box(self, lam: float, height: int, width: int) -> tuple[int, int, int, int]:
        """A rectangle covering about ``1 - lam`` of the image, centred anywhere (clipped at the borders)."""
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        return (
            max(cy - cut_h // 2, 0),
            min(cy + cut_h // 2, height),
            max(cx - cut_w // 2, 0),
            min(cx + cut_w // 2, width),
        )

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y0, y1, x0, x1 = self.box(self.lam(), *images.shape[-2:])
        images, masks = images.clone(), masks.clone()
        # the partner's pixels and labels are read from the same rolled batch: they stay aligned
        images[..., y0:y1, x0:x1] = images.roll(1, 0)[..., y0:y1, x0:x1]
        masks[..., y0:y1, x0:x1] = masks.roll(1, 0)[..., y0:y1, x0:x1]
        return images, masks


class SegmentationMixUp(_Mixer):
    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.lam()
        soft = soft_targets(masks, self.num_classes, self.ignore_index)
        return lam * images + (1 - lam) * images.roll(1, 0), lam * soft + (1 - lam) * soft.roll(1, 0)


def build_mixer(augment, num_classes: int, ignore_index: int):
    """One draw per batch: a mixer picked in proportion to its p, applied with probability max(p)."""
    if augment is None:
        return None
    mixers, probs = [], []
    if augment.mixup.enabled:
        mixers.append(SegmentationMixUp(augment.mixup.alpha, num_classes, ignore_index))
        probs.append(augment.mixup.p)
    if augment.cutmix.enabled:
        mixers.append(SegmentationCutMix(augment.cutmix.alpha, num_classes, ignore_index))
        probs.append(augment.cutmix.p)
    if not mixers or max(probs) == 0:
        return None

    def mix(images, masks):
        if torch.rand(()) >= max(probs):
            return images, masks
        k = int(torch.multinomial(torch.tensor(probs), 1))
        return mixers[k](images, masks)

    return mix
