"""The course's three input normalisations, computed from the training split by the normstats stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

MODES = ("none", "mean_image", "per_channel_mean", "per_channel_std")


class Normalize(v2.Transform):
    """Subtract the mean image or the per-channel mean, optionally divide by the per-channel std.

    Only images are touched; masks and boxes pass through. Images must already be at the
    training size for ``mean_image``.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, mode: str, mean: torch.Tensor, std: torch.Tensor | None = None):
        super().__init__()
        if mode not in MODES or mode == "none":
            raise ValueError(f"normalization must be one of {MODES[1:]}, got {mode!r}")
        self.mode = mode
        self.mean = mean.float()
        self.std = None if std is None else std.float().clamp_min(1e-6)

    def transform(self, inpt, params):
        out = inpt - (self.mean if self.mode == "mean_image" else self.mean[:, None, None])
        if self.std is not None:
            out = out / self.std[:, None, None]
        return tv_tensors.wrap(out, like=inpt)

    def undo(self, image: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] pixels, for pictures."""
        if self.std is not None:
            image = image * self.std[:, None, None]
        return image + (self.mean if self.mode == "mean_image" else self.mean[:, None, None])


def load_normalizer(stats_dir: str | Path, mode: str) -> Normalize | None:
    """Build the normalisation chosen in params from the files written by the normstats stage."""
    if mode == "none":
        return None
    stats_dir = Path(stats_dir)
    stats = json.loads((stats_dir / "stats.json").read_text())
    if mode == "mean_image":
        mean_image = torch.from_numpy(np.load(stats_dir / "mean_image.npy")).permute(2, 0, 1)
        return Normalize(mode, mean_image)
    mean = torch.tensor(stats["per_channel_mean"])
    std = torch.tensor(stats["per_channel_std"]) if mode == "per_channel_std" else None
    return Normalize(mode, mean, std)


class RunningStats:
    """One streaming pass over images: mean image, per-channel mean and std (float64 sums)."""

    def __init__(self):
        self.n_images = 0
        self.n_pixels = 0
        self.image_sum: torch.Tensor | None = None
        self.channel_sum = torch.zeros(3, dtype=torch.float64)
        self.channel_sq_sum = torch.zeros(3, dtype=torch.float64)

    def update(self, image: torch.Tensor) -> None:
        """``image``: float CxHxW in [0, 1] at the training size."""
        x = image.double()
        self.image_sum = x.clone() if self.image_sum is None else self.image_sum + x
        self.channel_sum += x.sum(dim=(1, 2))
        self.channel_sq_sum += (x * x).sum(dim=(1, 2))
        self.n_images += 1
        self.n_pixels += x.shape[1] * x.shape[2]

    def result(self) -> dict:
        if self.n_images == 0:
            raise ValueError("no training images to compute normalisation statistics from")
        mean = self.channel_sum / self.n_pixels
        var = (self.channel_sq_sum / self.n_pixels - mean * mean).clamp_min(0)
        return {
            "n_images": self.n_images,
            "per_channel_mean": mean.tolist(),
            "per_channel_std": var.sqrt().tolist(),
            "mean_image": (self.image_sum / self.n_images).float(),  # CxHxW
        }
