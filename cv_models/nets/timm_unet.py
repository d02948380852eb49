"""A U-Net decoder on a pretrained encoder: a timm network's ``features_only`` feature maps (strides 2 to 32) as
the skips, the project's U-Net decoder steps (stride-2 ConvTranspose up, concatenate the skip, two 3x3 convs), and
one last step back to the input's resolution whose skip is the input image itself (fine detail such as thin
membranes is lost at stride 2 otherwise).

``encoder`` is the pretrained part (model.weights: imagenet loads it; freeze_backbone and freeze_encoder_epochs
freeze it), ``decoder`` and ``head`` are new.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cv_models.nets.unet import conv_block
from cv_models.pretrained import split_name


class UpSkip(nn.Module):
    """Double the resolution with a stride-2 ConvTranspose, concatenate a skip of ``c_skip`` channels, convolve."""

    def __init__(self, c_in: int, c_skip: int, c_out: int, dropout: float = 0.0):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2)
        self.conv = conv_block(c_out + c_skip, c_out, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class EncoderUNet(nn.Module):
    """``encoder``: a network returning feature maps at strides 2, 4, ..., 2**k (timm's ``features_only``);
    decoder level i has ``width * 2**i`` channels. Inputs are padded to a multiple of 2**k, the output cropped back."""

    def __init__(
        self,
        encoder: nn.Module,
        channels: list[int],
        strides: list[int],
        num_classes: int,
        width: int = 16,
        dropout: float = 0.0,
    ):
        super().__init__()
        if strides != [2 ** (i + 1) for i in range(len(strides))]:
            raise ValueError(
                f"the encoder's feature maps must halve the resolution level by level from stride 2, "
                f"got strides {strides}"
            )
        self.encoder, self.step = encoder, strides[-1]
        widths = [width * 2**i for i in range(len(channels) - 1)]
        ins = widths[1:] + [channels[-1]]
        self.decoder = nn.ModuleList(
            [
                UpSkip(ins[i], channels[i], widths[i], dropout if i == len(widths) - 1 else 0.0)
                for i in reversed(range(len(widths)))
            ]
        )
        self.last = UpSkip(widths[0], 3, width)  # back to stride 1; the skip is the input image
        self.head = nn.Conv2d(width, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.step, (-w) % self.step
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "constant")
        features = self.encoder(x)
        y = features[-1]
        for up, skip in zip(self.decoder, reversed(features[:-1])):
            y = up(y, skip)
        return self.head(self.last(y, x))[..., :h, :w]


def encoder_unet(encoder_name: str, num_classes: int, width: int = 16, dropout: float = 0.0) -> EncoderUNet:
    """``encoder_name``: ``timm:<arch>`` (cv_models/pretrained.py PROVIDERS), all five levels (strides 2..32)."""
    provider, arch = split_name(encoder_name)
    encoder, channels, strides = provider.features(arch, (0, 1, 2, 3, 4))
    return EncoderUNet(encoder, channels, strides, num_classes, width, dropout)
