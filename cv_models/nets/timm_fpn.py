"""FPN- and DeepLab-style heads on a pretrained encoder: a timm network's ``features_only`` feature maps under
torchvision's own blocks, so no decoder is written twice and no dependency is added.

- :class:`EncoderFPN` (``timm_fpn``): torchvision's ``FeaturePyramidNetwork`` over the maps at strides 4 to 32,
  then the semantic head of Panoptic FPN (Kirillov et al. 2019): each pyramid level is convolved and upsampled to
  stride 4, the levels are summed, a 1x1 conv gives the classes, and bilinear interpolation the input's resolution.
- :class:`EncoderDeepLab` (``timm_deeplab``): DeepLabV3+ (Chen et al. 2018): torchvision's ``ASPP`` on the stride-32
  map, upsampled to stride 4 and concatenated with the reduced stride-4 map, two 3x3 convs, a 1x1 conv, bilinear up.

``encoder`` is the pretrained part (model.weights: imagenet loads it; freeze_backbone and freeze_encoder_epochs
freeze it); ``decoder`` and ``head`` are new. ``width`` sets the channels: 8x width in the pyramid (or the ASPP),
4x width in the merged map. Inputs are padded to a multiple of 32, the output cropped back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

from cv_models.pretrained import split_name

FPN_LEVELS = (1, 2, 3, 4)  # timm's features_only indices of the maps at strides 4, 8, 16, 32
DEEPLAB_LEVELS = (1, 4)  # strides 4 and 32
ATROUS_RATES = (2, 4, 6)  # ASPP at stride 32 (DeepLab's 6, 12, 18 are for stride 16 on 513-pixel crops)


def pad_to(x: torch.Tensor, step: int) -> torch.Tensor:
    """``x`` padded on the bottom and right to a multiple of ``step`` (reflected where the image is big enough)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % step, (-w) % step
    if not (pad_h or pad_w):
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "constant")


def _check_strides(strides: list[int], expected: list[int]) -> None:
    if strides != expected:
        raise ValueError(f"the encoder's feature maps must lie at strides {expected}, got {strides}")


class EncoderFPN(nn.Module):
    def __init__(self, encoder: nn.Module, channels: list[int], strides: list[int], num_classes: int, width: int = 16):
        super().__init__()
        _check_strides(strides, [4, 8, 16, 32])
        self.encoder = encoder
        self.fpn = FeaturePyramidNetwork(channels, 8 * width)
        # level i (stride 4 * 2**i): one 3x3 conv, then i times (upsample x2, 3x3 conv) down to stride 4
        self.decoder = nn.ModuleList(
            [
                nn.ModuleList(
                    [Conv2dNormActivation(8 * width if k == 0 else 4 * width, 4 * width, 3) for k in range(max(i, 1))]
                )
                for i in range(len(channels))
            ]
        )
        self.head = nn.Conv2d(4 * width, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        features = self.encoder(pad_to(x, 32))
        pyramid = self.fpn({str(i): f for i, f in enumerate(features)})
        merged = 0
        for i, (convs, p) in enumerate(zip(self.decoder, pyramid.values())):
            for conv in convs:
                p = conv(p)
                if i > 0:
                    p = F.interpolate(p, scale_factor=2.0, mode="bilinear", align_corners=False)
            merged = merged + p
        out = F.interpolate(self.head(merged), scale_factor=4.0, mode="bilinear", align_corners=False)
        return out[..., :h, :w]


class EncoderDeepLab(nn.Module):
    def __init__(self, encoder: nn.Module, channels: list[int], strides: list[int], num_classes: int, width: int = 16):
        super().__init__()
        _check_strides(strides, [4, 32])
        self.encoder = encoder
        self.aspp = ASPP(channels[-1], list(ATROUS_RATES), out_channels=8 * width)
        self.low = Conv2dNormActivation(channels[0], 3 * width, 1)  # DeepLabV3+: 48 channels at width 16
        self.decoder = nn.Sequential(
            Conv2dNormActivation(11 * width, 4 * width, 3), Conv2dNormActivation(4 * width, 4 * width, 3)
        )
        self.head = nn.Conv2d(4 * width, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        features = self.encoder(pad_to(x, 32))
        low = self.low(features[0])
        y = F.interpolate(self.aspp(features[-1]), size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.head(self.decoder(torch.cat([y, low], dim=1)))
        return F.interpolate(y, scale_factor=4.0, mode="bilinear", align_corners=False)[..., :h, :w]


def encoder_fpn(encoder_name: str, num_classes: int, width: int = 16) -> EncoderFPN:
    """``encoder_name``: ``timm:<arch>`` (cv_models/pretrained.py PROVIDERS), the levels at strides 4 to 32."""
    provider, arch = split_name(encoder_name)
    return EncoderFPN(*provider.features(arch, FPN_LEVELS), num_classes, width)


def encoder_deeplab(encoder_name: str, num_classes: int, width: int = 16) -> EncoderDeepLab:
    """``encoder_name``: ``timm:<arch>``; DeepLabV3+ reads the maps at strides 4 and 32."""
    provider, arch = split_name(encoder_name)
    return EncoderDeepLab(*provider.features(arch, DEEPLAB_LEVELS), num_classes, width)


# model.name -> builder (encoder name, classes, width): the segmentation task's registry takes these as they are
HEADS = {"timm_fpn": encoder_fpn, "timm_deeplab": encoder_deeplab}
