"""U-Net (Ronneberger et al. 2015), small enough for a CPU: conv blocks, max-pool down,
stride-2 ConvTranspose up, skip connections by concatenation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cv_models.nets.registry import register_net


def conv_block(c_in: int, c_out: int, dropout: float = 0.0) -> nn.Sequential:
    layers = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if dropout > 0:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


class Up(nn.Module):
    """Double the resolution with a learned stride-2 ConvTranspose, concatenate the skip, convolve."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2)
        self.conv = conv_block(2 * c_out, c_out, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """``depth`` down/up steps; level i has ``width * 2**i`` channels.

    ``encoder`` is the backbone (what ``model.freeze_backbone`` freezes) and ``head`` the 1x1
    classifier (what is re-fitted when loading weights with another number of classes).
    Inputs whose size is not a multiple of ``2**depth`` are padded and the output cropped back.
    """

    def __init__(self, num_classes: int, width: int = 16, depth: int = 3, dropout: float = 0.0, in_channels: int = 3):
        super().__init__()
        self.depth = depth
        widths = [width * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList(
            [conv_block(in_channels, widths[0])] + [conv_block(widths[i], widths[i + 1]) for i in range(depth)]
        )
        # dropout only in the deepest decoder step, where the most parameters are
        self.decoder = nn.ModuleList(
            [Up(widths[i + 1], widths[i], dropout if i == depth - 1 else 0.0) for i in reversed(range(depth))]
        )
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        step = 2**self.depth
        pad_h, pad_w = (-h) % step, (-w) % step
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "constant")
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.head(x)[..., :h, :w]


@register_net("unet")
def unet(num_classes: int, width: int = 16, depth: int = 3, dropout: float = 0.0, in_channels: int = 3, **_) -> UNet:
    return UNet(num_classes, width=width, depth=depth, dropout=dropout, in_channels=in_channels)
