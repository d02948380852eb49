"""MixUp, CutMix and copy-paste for instance segmentation (torchvision's v2.MixUp/CutMix handle
classification labels only). They work on a collated batch: ``images`` B x C x H x W (all one size)
and ``targets`` a list of ``{"boxes": N x 4 xyxy, "labels": N, "masks": N x H x W uint8, ...}``.

Each instance keeps its own mask; boxes are always recomputed from the masks, so an instance that
a pasted patch partly covers gets a tighter box, and one that ends up hidden (less than
``min_visible`` of its area left) or tiny (under ``min_area`` pixels) is removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torchvision.ops import masks_to_boxes

Target = dict[str, torch.Tensor]


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """xyxy boxes in pixel edges (x1 = last column + 1) of N x H x W masks; N x 4 float."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    boxes = masks_to_boxes(masks.bool())
    return boxes + torch.tensor([0.0, 0.0, 1.0, 1.0], device=masks.device)


def keep_instances(target: Target, keep: torch.Tensor) -> Target:
    """The target with only the instances where ``keep`` is True (per-instance tensors filtered)."""
    n = len(target["labels"])
    return {
        k: (v[keep] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n and k != "image_id" else v)
        for k, v in target.items()
    }


def tidy(target: Target, before_area: torch.Tensor | None, min_area: int, min_visible: float) -> Target:
    """Drop instances that became tiny or mostly hidden; boxes recomputed from what is left."""
    area = target["masks"].flatten(1).sum(1).float() if len(target["labels"]) else torch.zeros(0)
    keep = area >= max(min_area, 1)
    if before_area is not None and len(before_area):
        keep &= area >= min_visible * before_area.float()
    out = keep_instances(target, keep)
    out["boxes"] = boxes_from_masks(out["masks"])
    return out


def cat_targets(a: Target, b: Target) -> Target:
    out = dict(a)
    for k in ("boxes", "labels", "masks"):
        out[k] = torch.cat([a[k], b[k].to(a[k].dtype)])
    return out


def _areas(t: Target) -> torch.Tensor:
    return t["masks"].flatten(1).sum(1) if len(t["labels"]) else torch.zeros(0)


def mixup(img_a, tgt_a, img_b, tgt_b, lam: float, min_area: int, min_visible: float):
    """Blend the two images; both images' instances stay (each with its full mask)."""
    return lam * img_a + (1 - lam) * img_b, cat_targets(tgt_a, tgt_b)


def _cut_box(h: int, w: int, lam: float, gen: torch.Generator | None) -> tuple[int, int, int, int]:
    """A rectangle of about (1 - lam) of the image at a random centre (the CutMix paper's sampling)."""
    ratio = (1 - lam) ** 0.5
    ch, cw = int(h * ratio), int(w * ratio)
    cy, cx = int(torch.randint(h, (1,), generator=gen)), int(torch.randint(w, (1,), generator=gen))
    return max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)


def cutmix(img_a, tgt_a, img_b, tgt_b, lam: float, min_area: int, min_visible: float, gen=None):
    """Paste a rectangle of image b into image a: a's masks lose the rectangle, b's masks keep only it."""
    h, w = img_a.shape[-2:]
    y0, y1, x0, x1 = _cut_box(h, w, lam, gen)
    region = torch.zeros((h, w), dtype=torch.bool, device=img_a.device)
    region[y0:y1, x0:x1] = True
    image = torch.where(region, img_b, img_a)
    a_area, b_area = _areas(tgt_a), _areas(tgt_b)
    a = dict(tgt_a, masks=tgt_a["masks"] * ~region)
    b = dict(tgt_b, masks=tgt_b["masks"] * region)
    a, b = tidy(a, a_area, min_area, min_visible), tidy(b, b_area, min_area, min_visible)
    return image, cat_targets(a, b)


def copy_paste(img_a, tgt_a, img_b, tgt_b, lam: float, min_area: int, min_visible: float, gen=None):
    """Simple copy-paste (Ghiasi et al. 2021): some of b's instances, pixels and masks, pasted onto a.

    Each of b's instances is chosen with probability 0.5 (at least one); a's instances under the
    pasted pixels lose those pixels and are removed when mostly hidden.
    """
    n = len(tgt_b["labels"])
    if n == 0:
        return img_a, tgt_a
    chosen = torch.rand(n, generator=gen) < 0.5
    chosen[int(torch.randint(n, (1,), generator=gen))] = True
    pasted = keep_instances(tgt_b, chosen.to(tgt_b["labels"].device))
    if torch.rand((), generator=gen) < 0.5:  # mirror the pasted instances for more variety
        pasted = dict(pasted, masks=pasted["masks"].flip(-1))
        img_b = img_b.flip(-1)
    union = pasted["masks"].bool().any(0)
    image = torch.where(union, img_b, img_a)
    a = tidy(dict(tgt_a, masks=tgt_a["masks"] * ~union), _areas(tgt_a), min_area, min_visible)
    pasted = tidy(pasted, None, min_area, min_visible)
    return image, cat_targets(a, pasted)


MIXERS: dict[str, Callable] = {"mixup": mixup, "cutmix": cutmix, "copy_paste": copy_paste}


@dataclass
class MixOp:
    name: str
    p: float
    alpha: float


class InstanceBatchMixer:
    """Per sample: with probability max(p) one of the enabled mixers (picked in proportion to its p),
    the partner being the next sample of the batch as it came from the loader."""

    def __init__(self, ops: list[MixOp], min_area: int = 16, min_visible: float = 0.25, generator=None):
        self.ops, self.min_area, self.min_visible, self.gen = ops, min_area, min_visible, generator

    def __call__(self, images: torch.Tensor, targets: list[Target]):
        n = len(targets)
        if n < 2 or not self.ops:
            return images, targets
        probs = torch.tensor([op.p for op in self.ops])
        out_images, out_targets = images.clone(), list(targets)
        for i in range(n):
            if torch.rand((), generator=self.gen) >= probs.max():
                continue
            op = self.ops[int(torch.multinomial(probs, 1, generator=self.gen))]
            lam = float(torch.distributions.Beta(op.alpha, op.alpha).sample())
            j = (i + 1) % n
            extra = {} if op.name == "mixup" else {"gen": self.gen}
            out_images[i], out_targets[i] = MIXERS[op.name](
                images[i], targets[i], images[j], targets[j], lam, self.min_area, self.min_visible, **extra
            )
        return out_images, out_targets
