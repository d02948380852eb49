"""Test-time augmentation for detection (``options.tta``): the detector runs on flipped (and transposed) copies of
the images, each view's boxes are mapped back, and boxes of one class that overlap are fused (a weighted box fusion:
score-weighted mean corners, the score the views' mean of their best match, 0 for a view that missed the object).
The evaluate stage's scores and every prediction use it; validation during training does not, and an exported
model is the plain detector."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms, box_iou

from cv_models.augment import VIEWS, apply_view

FUSE_IOU = 0.55  # boxes of one class overlapping by more are one object


def _boxes(b: torch.Tensor, ops: tuple[str, ...], hw: tuple[int, int]) -> torch.Tensor:
    """x0 y0 x1 y1 boxes of an image of size ``hw`` moved as ``apply_view`` moves its pixels."""
    h, w = hw
    for op in ops:
        x0, y0, x1, y1 = b.unbind(-1)
        if op == "h":
            b = torch.stack([w - x1, y0, w - x0, y1], -1)
        elif op == "v":
            b = torch.stack([x0, h - y1, x1, h - y0], -1)
        else:
            b = torch.stack([y0, x0, y1, x1], -1)
            h, w = w, h
    return b


def fuse(outputs: list[dict], limit: int) -> dict:
    """One image's views (boxes already in its orientation) fused into at most ``limit`` detections."""
    boxes = torch.cat([o["boxes"] for o in outputs])
    scores = torch.cat([o["scores"] for o in outputs])
    labels = torch.cat([o["labels"] for o in outputs])
    if not len(scores):  # no view found anything
        return {"boxes": boxes.reshape(0, 4), "scores": scores, "labels": labels}
    view = torch.cat([torch.full((len(o["scores"]),), k) for k, o in enumerate(outputs)])
    keep = batched_nms(boxes, scores, labels, FUSE_IOU)[:limit]
    # K x N: which boxes each kept one stands for (its own among them)
    same = (labels[keep][:, None] == labels[None]) & (box_iou(boxes[keep], boxes) > FUSE_IOU)
    weight = same * scores[None]
    fused = weight @ boxes / weight.sum(1, keepdim=True)
    best = torch.stack([(weight * (view == k)[None]).amax(1) for k in range(len(outputs))], 1)  # K x views
    score = best.mean(1)
    order = score.argsort(descending=True)
    return {"boxes": fused[order], "scores": score[order], "labels": labels[keep][order]}


def tta_detections(model, images: list[torch.Tensor], mode: str = "none") -> list[dict]:
    """The detector's outputs for ``images`` (each C x H x W), fused over the mode's views for any mode but ``none``."""
    views = VIEWS[mode]
    if len(views) == 1:
        return model(images)
    per_view = [model([apply_view(im, ops) for im in images]) for ops in views]
    fused = []
    for k, im in enumerate(images):
        hw = tuple(im.shape[-2:])
        back = []
        for ops, outs in zip(views, per_view):
            seen = hw[::-1] if ops.count("t") % 2 else hw  # the view's own size
            back.append({**outs[k], "boxes": _boxes(outs[k]["boxes"], ops[::-1], seen)})
        fused.append(fuse(back, max(len(o["scores"]) for o in back)))
    return fused
