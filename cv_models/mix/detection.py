"""Batch-level mixing for detection, written here because torchvision's MixUp and CutMix handle no
boxes (vision issue 6720).

Images are float CxHxW tensors of one size; targets are dicts with ``boxes`` (XYXY pixels),
``labels`` and ``weights`` (per-box loss weight, 1 for an unmixed box).

* MixUp: two images blended ``lam * a + (1 - lam) * b``; both box sets kept, a's boxes weighted
  ``lam`` and b's ``1 - lam`` (the weighted detector heads scale each box's loss by it).
* Mosaic: four images cropped into the quadrants around a random centre; boxes clipped to their
  quadrant, leftovers with too little of the box visible (or thinner than ``min_side``) removed.
* CutMix: a rectangle of b pasted into a; b's boxes clipped to the rectangle, a's boxes the
  rectangle mostly covers removed (same visibility rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _with_weights(t: dict) -> dict:
    if "weights" in t:
        return t
    return {**t, "weights": torch.ones(len(t["labels"]), dtype=torch.float32, device=t["labels"].device)}


def _select(t: dict, keep: torch.Tensor, boxes: torch.Tensor | None = None) -> dict:
    out = {
        **t,
        "boxes": (t["boxes"] if boxes is None else boxes)[keep],
        "labels": t["labels"][keep],
        "weights": t["weights"][keep],
    }
    return out


def _area(b: torch.Tensor) -> torch.Tensor:
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def clip_to_region(
    t: dict,
    region: tuple[float, float, float, float],
    min_visible: float,
    min_side: float,
    shift: tuple[float, float] = (0.0, 0.0),
) -> dict:
    """Boxes moved by ``shift``, clipped to ``region`` (x0, y0, x1, y1); keep those with at least
    ``min_visible`` of their area left and both sides at least ``min_side`` pixels."""
    b = t["boxes"] + torch.tensor(
        [shift[0], shift[1], shift[0], shift[1]], dtype=t["boxes"].dtype, device=t["boxes"].device
    )
    x0, y0, x1, y1 = region
    clipped = torch.stack(
        [b[:, 0].clamp(x0, x1), b[:, 1].clamp(y0, y1), b[:, 2].clamp(x0, x1), b[:, 3].clamp(y0, y1)], 1
    )
    keep = (
        (_area(clipped) >= min_visible * _area(b).clamp(min=1e-6))
        & ((clipped[:, 2] - clipped[:, 0]) >= min_side)
        & ((clipped[:, 3] - clipped[:, 1]) >= min_side)
    )
    return _select(t, keep, clipped)


def drop_covered(t: dict, region: tuple[float, float, float, float], min_visible: float) -> dict:
    """Remove boxes of which less than ``min_visible`` stays uncovered by ``region``."""
    b = t["boxes"]
    x0, y0, x1, y1 = region
    iw = (b[:, 2].clamp(max=x1) - b[:, 0].clamp(min=x0)).clamp(min=0)
    ih = (b[:, 3].clamp(max=y1) - b[:, 1].clamp(min=y0)).clamp(min=0)
    visible = 1 - iw * ih / _area(b).clamp(min=1e-6)
    return _select(t, visible >= min_visible)


def _cat(parts: list[dict], base: dict) -> dict:
    return {
        **base,
        "boxes": torch.cat([p["boxes"] for p in parts]),
        "labels": torch.cat([p["labels"] for p in parts]),
        "weights": torch.cat([p["weights"] for p in parts]),
    }


def mixup(a: torch.Tensor, ta: dict, b: torch.Tensor, tb: dict, lam: float) -> tuple[torch.Tensor, dict]:
    ta, tb = _with_weights(ta), _with_weights(tb)
    image = lam * a + (1 - lam) * b
    return image, _cat([{**ta, "weights": ta["weights"] * lam}, {**tb, "weights": tb["weights"] * (1 - lam)}], ta)


def mosaic(
    images: list[torch.Tensor],
    targets: list[dict],
    centre: tuple[int, int],
    offsets: list[tuple[int, int]],
    min_visible: float,
    min_side: float,
) -> tuple[torch.Tensor, dict]:
    """Four same-size images; quadrant k is the crop of image k at ``offsets[k]`` (top-left of the crop)."""
    _, h, w = images[0].shape
    cx, cy = centre
    out = torch.empty_like(images[0])
    regions = [(0, 0, cx, cy), (cx, 0, w, cy), (0, cy, cx, h), (cx, cy, w, h)]
    parts = []
    for img, t, (x0, y0, x1, y1), (ox, oy) in zip(images, targets, regions, offsets):
        rw, rh = x1 - x0, y1 - y0
        out[:, y0:y1, x0:x1] = img[:, oy : oy + rh, ox : ox + rw]
        parts.append(
            clip_to_region(_with_weights(t), (x0, y0, x1, y1), min_visible, min_side, shift=(x0 - ox, y0 - oy))
        )
    return out, _cat(parts, targets[0])


def cutmix(
    a: torch.Tensor,
    ta: dict,
    b: torch.Tensor,
    tb: dict,
    region: tuple[int, int, int, int],
    min_visible: float,
    min_side: float,
) -> tuple[torch.Tensor, dict]:
    x0, y0, x1, y1 = region
    image = a.clone()
    image[:, y0:y1, x0:x1] = b[:, y0:y1, x0:x1]
    kept_a = drop_covered(_with_weights(ta), region, min_visible)
    pasted_b = clip_to_region(_with_weights(tb), region, min_visible, min_side)
    return image, _cat([kept_a, pasted_b], ta)


@dataclass
class DetectionMixer:
    """Per image of a batch: with probability ``max(p)`` one of the enabled mixers (picked in
    proportion to its p) combines it with random partners from the same batch."""

    mixup_p: float = 0.0
    mixup_alpha: float = 1.5
    mosaic_p: float = 0.0
    cutmix_p: float = 0.0
    cutmix_alpha: float = 1.0
    min_visible: float = 0.3
    min_side: float = 2.0

    def __call__(self, images, targets):
        n = len(images)
        targets = [_with_weights(t) for t in targets]
        probs = torch.tensor([self.mixup_p, self.mosaic_p, self.cutmix_p])
        if n < 2 or probs.max() <= 0:
            return images, targets
        out_images, out_targets = list(images), list(targets)
        for i in range(n):
            if torch.rand(()) >= probs.max():
                continue
            kind = int(torch.multinomial(probs, 1))
            others = [j for j in torch.randperm(n).tolist() if j != i]
            if kind == 0:
                lam = float(torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample())
                out_images[i], out_targets[i] = mixup(images[i], targets[i], images[others[0]], targets[others[0]], lam)
            elif kind == 1:
                picks = [i] + [others[k % len(others)] for k in range(3)]
                _, h, w = images[i].shape
                cx, cy = int(torch.randint(w // 4, 3 * w // 4 + 1, ())), int(torch.randint(h // 4, 3 * h // 4 + 1, ()))
                sizes = [(cx, cy), (w - cx, cy), (cx, h - cy), (w - cx, h - cy)]
                offsets = [
                    (int(torch.randint(0, w - rw + 1, ())), int(torch.randint(0, h - rh + 1, ()))) for rw, rh in sizes
                ]
                out_images[i], out_targets[i] = mosaic(
                    [images[k] for k in picks],
                    [targets[k] for k in picks],
                    (cx, cy),
                    offsets,
                    self.min_visible,
                    self.min_side,
                )
            else:
                _, h, w = images[i].shape
                lam = float(torch.distributions.Beta(self.cutmix_alpha, self.cutmix_alpha).sample())
                rw, rh = int(w * math.sqrt(1 - lam)), int(h * math.sqrt(1 - lam))
                x0, y0 = int(torch.randint(0, w - rw + 1, ())), int(torch.randint(0, h - rh + 1, ()))
                out_images[i], out_targets[i] = cutmix(
                    images[i],
                    targets[i],
                    images[others[0]],
                    targets[others[0]],
                    (x0, y0, x0 + rw, y0 + rh),
                    self.min_visible,
                    self.min_side,
                )
        return out_images, out_targets
