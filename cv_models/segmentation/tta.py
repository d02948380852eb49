"""Test-time augmentation for segmentation (``options.tta``): the network's class probabilities averaged over
flipped (and transposed) copies of the image, each mapped back to the image's orientation first. The evaluate
stage's scores and every prediction use it; validation during training does not (it would cost every pass the
views' count), and an exported model is the plain network."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cv_models.segmentation.networks import model_outputs
from cv_models.augment import VIEWS, apply_view


def tta_logits(model, x: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """N x C scores of ``x``: the network's logits for ``none``, else the log of the class probabilities averaged
    over the mode's views (a log-probability: its argmax is the prediction, cross-entropy reads it as logits)."""
    views = VIEWS[mode]
    if len(views) == 1:
        return model_outputs(model(x))[0]
    probs = None
    for ops in views:
        p = F.softmax(apply_view(model_outputs(model(apply_view(x, ops)))[0], ops[::-1]), dim=1)
        probs = p if probs is None else probs + p
    assert probs is not None
    return (probs / len(views)).clamp_min(1e-12).log()
