"""Segmentation losses by name (``train.loss.name``): cross-entropy, Dice, and both summed.

Every loss takes logits ``N x C x H x W`` and either hard targets ``N x H x W`` (class indices,
``ignore_index`` for unlabelled pixels) or soft per-pixel targets ``N x C x H x W`` (MixUp);
a soft pixel whose weights sum to less than one (mixed with an ignored pixel) counts that much less.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from cv_models.settings import LossConfig

SegLoss = Callable[[torch.Tensor, torch.Tensor, LossConfig], torch.Tensor]
LOSSES: dict[str, SegLoss] = {}


def register_loss(name: str):
    def wrap(fn: SegLoss) -> SegLoss:
        LOSSES[name] = fn
        return fn

    return wrap


def soft_targets(targets: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Hard masks -> one-hot float ``N x C x H x W``, all zeros at ignored pixels; soft targets pass through."""
    if targets.is_floating_point():
        return targets
    valid = targets != ignore_index
    one_hot = F.one_hot(torch.where(valid, targets, 0).long(), num_classes).permute(0, 3, 1, 2).float()
    return one_hot * valid[:, None]


def _class_weights(cfg: LossConfig, num_classes: int, like: torch.Tensor) -> torch.Tensor | None:
    if not cfg.class_weights:
        return None
    if len(cfg.class_weights) != num_classes:
        raise ValueError(f"train.loss.class_weights has {len(cfg.class_weights)} values for {num_classes} classes")
    return torch.tensor(cfg.class_weights, dtype=like.dtype, device=like.device)


@register_loss("cross_entropy")
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    weight = _class_weights(cfg, logits.shape[1], logits)
    if not targets.is_floating_point():  # PyTorch's own kernel: the fast path for plain batches
        return F.cross_entropy(
            logits, targets.long(), weight=weight, ignore_index=cfg.ignore_index, label_smoothing=cfg.label_smoothing
        )
    t = targets
    if cfg.label_smoothing:
        mass = t.sum(1, keepdim=True)  # smooth only the labelled share of each pixel
        t = t * (1 - cfg.label_smoothing) + mass * cfg.label_smoothing / t.shape[1]
    if weight is not None:
        t = t * weight[None, :, None, None]
    # weighted mean over pixels, as F.cross_entropy does for hard labels
    return -(t * F.log_softmax(logits, dim=1)).sum() / t.sum().clamp_min(1e-8)


@register_loss("dice")
def dice(logits: torch.Tensor, targets: torch.Tensor, cfg: LossConfig, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over classes, computed over the whole batch (ignored pixels left out)."""
    t = soft_targets(targets, logits.shape[1], cfg.ignore_index)
    labelled = t.sum(1, keepdim=True).clamp(max=1)
    p = logits.softmax(1) * labelled
    dims = (0, 2, 3)
    per_class = (2 * (p * t).sum(dims) + smooth) / (p.sum(dims) + t.sum(dims) + smooth)
    weight = _class_weights(cfg, logits.shape[1], logits)
    if weight is not None:
        return 1 - (per_class * weight).sum() / weight.sum()
    return 1 - per_class.mean()


@register_loss("ce_dice")
def ce_dice(logits: torch.Tensor, targets: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    return cross_entropy(logits, targets, cfg) + dice(logits, targets, cfg)


def get_loss(name: str) -> SegLoss:
    if name not in LOSSES:
        raise ValueError(f"train.loss.name {name!r} is not a segmentation loss; choose one of {sorted(LOSSES)}")
    return LOSSES[name]
