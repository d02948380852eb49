"""The segmentation task's data: the listing of ``data.format`` (its readers live in cv_models/data/class_masks.py),
the :class:`~cv_models.data.class_masks.MaskReader` built from ``data.options``, the dataset of image and mask
pairs, the batches, and the augmentations that must know the mask (cutout, rotation, rescale, elastic)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from cv_models.augment import Builder, random_apply
from cv_models.base import DataError
from cv_models.data.class_masks import CocoMaskListing, MaskFolderListing, MaskReader
from cv_models.data.probe import load_rgb
from cv_models.data.registry import reader
from cv_models.segmentation.settings import SegmentationDataOptions
from cv_models.settings import DataConfig


def read_listing(name: str, data: DataConfig, ignore_index: int) -> MaskFolderListing | CocoMaskListing:
    """The reader's listing of ``data.format`` (cv_models/data/class_masks.py), after the folder and the ignore
    index are checked."""
    root = Path(data.path)
    if not root.is_dir():
        raise DataError(
            f"dataset path {root} does not exist or is not a folder (rule: data.path must be an existing folder)"
        )
    if not 0 <= ignore_index <= 255:
        raise DataError(f"train.loss.ignore_index must be within 0..255 (8-bit masks), got {ignore_index}")
    return reader(name, data.format)(data)


def build_mask_reader(o: SegmentationDataOptions, n_classes: int, ignore_index: int) -> MaskReader:
    """How mask files become class indices, from ``data.options`` (colours, ignore values, value map)."""
    if o.mask_color_mode not in ("convert", "reject"):
        raise DataError(f"data.options.mask_color_mode must be convert or reject, got {o.mask_color_mode!r}")
    if o.colors and len(o.colors) != n_classes:
        raise DataError(
            f"data.options.colors has {len(o.colors)} colours for {n_classes} classes "
            f"(rule: one [r, g, b] per declared class)"
        )
    return MaskReader(
        o.colors,
        o.ignore_color,
        ignore_index,
        o.mask_color_mode,
        tuple(int(v) for v in o.ignore_values or ()),
        bool(o.palette_as_index),
        {int(k): int(v) for k, v in (o.value_map or {}).items()},
    )


class SegmentationDataset(Dataset):
    """``(image, tv_tensors.Mask)`` pairs; masks are read (or rasterised) once and kept in memory."""

    def __init__(self, samples: list[dict], load_mask: Callable[[dict], np.ndarray], transforms):
        self.samples = samples
        self.load_mask = load_mask
        self.transforms = transforms
        self._masks: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def mask(self, i: int) -> torch.Tensor:
        if i not in self._masks:
            try:
                m = self.load_mask(self.samples[i])
            except DataError:
                raise
            except Exception as err:  # noqa: BLE001 - a bad mask stops with its name and the rule, not a PIL traceback
                raise DataError(
                    f"{self.samples[i]['mask_source']}: mask cannot be read ({type(err).__name__}: {err}) "
                    f"(rule: every mask decodes; run the validate stage)"
                ) from None
            if m.min() < 0 or m.max() > 255:
                raise DataError(
                    f"{self.samples[i]['mask_source']}: mask values outside 0..255 or undeclared colours "
                    f"(rule: mask values in the declared classes; run the validate stage)"
                )
            self._masks[i] = torch.from_numpy(m.astype(np.uint8))
        return self._masks[i]

    def __getitem__(self, i: int):
        image = load_rgb(self.samples[i]["path"])
        mask = tv_tensors.Mask(self.mask(i))
        if self.transforms is not None:
            return self.transforms(image, mask)
        return image, mask


def collate_pairs(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Images stacked as floats, masks as a long tensor of class indices."""
    images = torch.stack([b[0].as_subclass(torch.Tensor) for b in batch])
    masks = torch.stack([b[1].as_subclass(torch.Tensor) for b in batch]).long()
    return images, masks


# ------------------------------------------------------------------ augmentations that know the mask
class SegmentationCutout(v2.RandomErasing):
    """Cutout that also decides the erased region's label: ``ignore`` (not trained on) or ``keep``."""

    def __init__(self, mask_fill: str, ignore_index: int, **kwargs):
        super().__init__(**kwargs)
        self.mask_fill, self.ignore_index = mask_fill, ignore_index

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            if self.mask_fill == "keep" or params["v"] is None:
                return inpt
            out = inpt.clone()
            i, j, h, w = params["i"], params["j"], params["h"], params["w"]
            out[..., i : i + h, j : j + w] = self.ignore_index
            return out
        return super().transform(inpt, params)


def uncovered_unlabelled(image_fill: int, ignore_index: int) -> dict:
    """Fill of the pixels a rotation or zoom-out uncovers: the image's fill value, and in the mask the ignore
    index, so they are not trained as class 0 (the background of the shapes, but the membrane of EM slices)."""
    return {tv_tensors.Image: image_fill, tv_tensors.Mask: ignore_index}


def mask_aware_builders(ignore_index: int) -> dict[str, Builder]:
    """The builders of the augmentations whose mask needs the ignore index: ``{name: (settings, size) -> transform}``
    (v2 resizes, rotates and crops tv_tensors.Mask with nearest interpolation: no new label values)."""

    def cutout(c, size):
        return SegmentationCutout(c.mask_fill, ignore_index, p=c.p, scale=tuple(c.scale), value=0)

    def rotation(c, size):
        return random_apply(v2.RandomRotation(degrees=c.degrees, fill=uncovered_unlabelled(c.fill, ignore_index)), c.p)

    def rescale(c, size):
        fill = uncovered_unlabelled(0, ignore_index)
        return random_apply(v2.RandomAffine(degrees=0, scale=tuple(c.scale), fill=fill), c.p)

    def elastic_unlabelled(c, size):
        return elastic(c, size, fill=uncovered_unlabelled(0, ignore_index))

    return {"cutout": cutout, "rotation": rotation, "rescale": rescale, "elastic": elastic_unlabelled}


def elastic(c, size, fill: dict | None = None) -> v2.Transform:
    """``augment.elastic``: torchvision's ElasticTransform (masks displaced with nearest interpolation); ``fill``: the
    values of pixels drawn from outside the image."""
    return random_apply(v2.ElasticTransform(alpha=c.alpha, sigma=c.sigma, fill=fill or 0), c.p)
