"""Semantic segmentation: image folders with same-named PNG class-index masks, or COCO JSON
rasterised to class masks; a U-Net or torchvision's FCN / DeepLabV3 / LRASPP; mIoU.

Class ``k`` of ``data.classes`` is mask value ``k``; ``classes[0]`` is the background.
Pixels equal to ``train.loss.ignore_index`` (default 255) are unlabelled: left out of the loss
and the metrics. Reader settings live in ``data.options`` (see params.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from cv_models.augment import build_transforms
from cv_models.base import Check, CVTask, DataError, EvalResult, Prediction, in_order, never_predicted, register_task
from cv_models.data.class_masks import INDEX_MODES, SPLITS, CocoMaskListing, MaskFolderListing, MaskReader, mask_facts
from cv_models.data.probe import IMAGE_SUFFIXES, load_rgb, probe_image
from cv_models.data.registry import reader
from cv_models.mix.segmentation import build_mixer
from cv_models.nets import NETS
from cv_models.nets.timm_fpn import HEADS
from cv_models.nets.timm_unet import encoder_unet
from cv_models.seg_losses import get_loss
from cv_models.augment import random_apply, with_builders
from cv_models.settings import AugmentConfig, CutoutAug, Strict, task_settings
from cv_models.weights import freeze, load_into, read_checkpoint, torchvision_state_dict

# colours for drawing when data.options.colors is not given (background first, black)
PALETTE = [
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
]


# ------------------------------------------------------------------ settings (tasks.segmentation in params.yaml)
class SegmentationDataOptions(Strict):
    """``data.options``: where the masks are and how their pixel values become classes."""

    # folders under data.path; a "{split}" in them is replaced by the split's name on disk (data.options.splits),
    # e.g. SegNet "{split}" + "{split}annot", ADE20K "images/{split}" + "annotations/{split}"; without "{split}"
    # the split folders are <dir>/train, val, test (split_from=folders) or none (split_from=seed)
    images_dir: str = "images"  # under data.path
    masks_dir: str = "masks"  # same sub-folders (or {split} template) and file stems as images_dir
    splits: dict[str, str] | None = (
        None  # split -> name on disk, e.g. {train: training, val: validation, test: testing}
    )
    split_list: str | None = None  # a list of image stems per split, e.g. VOC "ImageSets/Segmentation/{split}.txt"
    image_suffix: str = ".jpg"  # split_list: the images' suffix (others are tried when absent)
    value_map: dict[int, int] | None = (
        None  # raw mask value -> class index, e.g. {255: 1} for 0/255 binary masks (applied first)
    )
    ignore_values: list[
        int
    ] = []  # mask values that mean unlabelled (SegNet/CamVid 11, ADE20K 0): read as train.loss.ignore_index
    palette_as_index: bool = (
        False  # palette (mode P) masks hold class indices (Pascal VOC): read the indices, not colours
    )
    mask_suffix: str = ".png"  # mask file = image stem + this
    annotations: str = "annotations/{split}.json"  # format coco: one file per split, or one file for split_from=seed
    mask_color_mode: Literal["convert", "reject"] = "convert"  # palette / RGB masks: convert through `colors` | reject
    colors: list[tuple[int, int, int]] | None = None  # one [r, g, b] per class, for palette/RGB masks and pictures
    ignore_color: tuple[int, int, int] | None = None  # [r, g, b] of unlabelled pixels in palette/RGB masks


class SegmentationModelOptions(Strict):
    """``model.options``: torchvision segmentation models only (the U-Net takes width, depth and dropout; the
    timm_unet its encoder, width and dropout)."""

    aux_loss: bool = False  # fcn / deeplabv3: the auxiliary head, weighted 0.5 in the loss
    weights_backbone: str | None = (
        None  # torchvision ImageNet backbone weights (DEFAULT, IMAGENET1K_V1...); None = no download
    )
    backbone_weights: str = (
        "none"  # or the trunk of a classifier checkpoint of the same family (models/pretrain/backbone.pt)
    )
    kwargs: dict[str, Any] = {}  # extra keyword arguments of the torchvision builder
    encoder: str = "timm:efficientnet_lite0"  # timm_unet / timm_fpn / timm_deeplab: the pretrained encoder


class SegmentationCutoutAug(CutoutAug):
    mask_fill: Literal["ignore", "keep"] = "ignore"  # what the erased region's mask becomes: not trained on | kept


class SegmentationAugment(AugmentConfig):
    cutout: SegmentationCutoutAug = SegmentationCutoutAug()


class SegmentationOptions(Strict):
    overlay_samples: int = Field(8, ge=0)  # test images drawn with true and predicted masks


SETTINGS = task_settings(
    "Segmentation",
    data_options=SegmentationDataOptions,
    model_options=SegmentationModelOptions,
    augment=SegmentationAugment,
    options=SegmentationOptions,
)


# ---------------------------------------------------------------------- reading
# the readers (mask folders, COCO) and MaskReader: cv_models/data/class_masks.py


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


# ------------------------------------------------------------------------ models


@dataclass
class Architecture:
    build: Callable[[int, object], nn.Module]  # (num_classes, ModelConfig) -> model
    head_prefixes: tuple[str, ...]  # re-fitted when weights come from another class count
    backbone_prefixes: tuple[str, ...]  # frozen by model.freeze_backbone
    # the network whose ImageNet weights model.weights: imagenet loads into the model's `encoder` (None: none)
    pretrained: Callable[[object], str | None] = lambda m: None


def _torchvision_builder(name: str, aux: bool):
    def build(num_classes: int, m) -> nn.Module:
        from torchvision.models import get_model

        o = m.options
        # no ImageNet download unless asked for (model.options.weights_backbone: DEFAULT | IMAGENET1K_V1 ...)
        kwargs = {"weights": None, "weights_backbone": o.weights_backbone, "num_classes": num_classes}
        # or the trunk of a classifier checkpoint of the same family (the pretraining stage's models/pretrain/backbone.pt)
        backbone_file = o.backbone_weights
        if aux:
            kwargs["aux_loss"] = o.aux_loss
        elif o.aux_loss:
            raise ValueError(f"model.options.aux_loss: {name} has no auxiliary head")
        model = get_model(name, **kwargs, **o.kwargs)
        if backbone_file != "none":
            from cv_models.weights import load_backbone

            # torchvision wraps mobilenet's `features` (keys features.N...) and a resnet's layers directly
            load_backbone(model.backbone, backbone_file, strip_prefix="features." if "mobilenet" in name else "")
        return model

    return build


ARCHITECTURES: dict[str, Architecture] = {
    "unet": Architecture(
        lambda n, m: NETS["unet"](num_classes=n, width=m.width, depth=m.depth, dropout=m.dropout),
        ("head.",),
        ("encoder.",),
    ),
    # the U-Net decoder (ConvTranspose up) on a timm encoder's feature maps (cv_models/nets/timm_unet.py)
    "timm_unet": Architecture(
        lambda n, m: encoder_unet(m.options.encoder, n, width=m.width, dropout=m.dropout),
        ("head.",),
        ("encoder.",),
        pretrained=lambda m: m.options.encoder,
    ),
    # timm_fpn, timm_deeplab: torchvision's FPN or ASPP (DeepLabV3+) on a timm encoder (cv_models/nets/timm_fpn.py)
    **{
        name: Architecture(
            lambda n, m, build=build: build(m.options.encoder, n, width=m.width),
            ("head.",),
            ("encoder.",),
            pretrained=lambda m: m.options.encoder,
        )
        for name, build in HEADS.items()
    },
    **{
        name: Architecture(_torchvision_builder(name, aux=True), ("classifier.4.", "aux_classifier.4."), ("backbone.",))
        for name in (
            "fcn_resnet50",
            "fcn_resnet101",
            "deeplabv3_resnet50",
            "deeplabv3_resnet101",
            "deeplabv3_mobilenet_v3_large",
        )
    },
    "lraspp_mobilenet_v3_large": Architecture(
        _torchvision_builder("lraspp_mobilenet_v3_large", aux=False),
        ("classifier.low_classifier.", "classifier.high_classifier."),
        ("backbone.",),
    ),
}


def model_outputs(output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torchvision's models return ``{"out", "aux"}``; ours a tensor."""
    if isinstance(output, dict):
        return output["out"], output.get("aux")
    return output, None


class LogitsOnly(nn.Module):
    """torchvision's ``{"out", "aux"}`` dict reduced to the logits tensor, for export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out["out"] if isinstance(out, dict) else out


def to_size(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x C logits resized (bilinear) to ``size`` (h, w): the prediction at an image's own resolution is their argmax."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """``num_classes x num_classes`` pixel counts, rows = true class, ignored pixels left out."""
    valid = target != ignore_index
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


# -------------------------------------------------------------------------- task


@register_task
class SegmentationTask(CVTask):
    name = "segmentation"
    primary_metric = "miou"
    settings = SETTINGS
    results_file = "predictions.csv"

    # ------------------------------------------------------------------ config
    @property
    def options(self) -> dict:
        return self.cfg.data.options.model_dump()

    @property
    def ignore_index(self) -> int:
        return self.cfg.train.loss.ignore_index

    def colors(self) -> list[tuple[int, int, int]]:
        declared = self.options["colors"]
        if declared:
            return [tuple(int(v) for v in c) for c in declared]
        return [PALETTE[k % len(PALETTE)] for k in range(len(self.class_names()))]

    def mask_reader(self) -> MaskReader:
        o = self.options
        if o["mask_color_mode"] not in ("convert", "reject"):
            raise DataError(f"data.options.mask_color_mode must be convert or reject, got {o['mask_color_mode']!r}")
        if o["colors"] and len(o["colors"]) != len(self.class_names()):
            raise DataError(
                f"data.options.colors has {len(o['colors'])} colours for {len(self.class_names())} classes "
                f"(rule: one [r, g, b] per declared class)"
            )
        return MaskReader(
            o["colors"],
            o["ignore_color"],
            self.ignore_index,
            o["mask_color_mode"],
            tuple(int(v) for v in o["ignore_values"] or ()),
            bool(o["palette_as_index"]),
            {int(k): int(v) for k, v in (o["value_map"] or {}).items()},
        )

    # ------------------------------------------------------------------ listing
    def _read(self) -> MaskFolderListing | CocoMaskListing:
        """The reader's listing of ``data.format`` (cv_models/data/class_masks.py), read once per task object."""
        if not hasattr(self, "_listing"):
            d = self.cfg.data
            root = Path(d.path)
            if not root.is_dir():
                raise DataError(
                    f"dataset path {root} does not exist or is not a folder (rule: data.path must be an existing folder)"
                )
            if not 0 <= self.ignore_index <= 255:
                raise DataError(f"train.loss.ignore_index must be within 0..255 (8-bit masks), got {self.ignore_index}")
            self._listing = reader(self.name, d.format)(d)
        return self._listing

    def _samples(self) -> list[dict]:
        return self._read().rows

    def class_names(self) -> list[str]:
        if self.cfg.data.classes:
            return list(self.cfg.data.classes)
        return self._read().class_names()

    # ----------------------------------------------------------------- masks
    def load_mask(self, row: dict) -> np.ndarray:
        return self._read().read(row, self.class_names, self.ignore_index, self.mask_reader)[0]

    # ------------------------------------------------------------ validation
    def validation_tables(self) -> dict[str, pd.DataFrame]:
        rows = self._samples()
        names = self.class_names()
        reader = self.mask_reader()
        records, pixel_rows = [], []
        for r in rows:
            image = (
                probe_image(Path(r["path"]))
                if Path(r["path"]).is_file()
                else {
                    "bytes": 0,
                    "sha256": f"missing:{r['path']}",
                    "width": 0,
                    "height": 0,
                    "channels": 0,
                    "mode": "",
                    "decodes": False,
                    "error": "file missing",
                }
            )
            facts = mask_facts(self._read(), r, names, self.ignore_index, reader)
            counts = facts.pop("counts")
            if counts is not None:
                pixel_rows += [
                    {"split": r["split"], "class": names[k], "pixels": int(c), "image": int(c > 0)}
                    for k, c in enumerate(counts)
                ]
            records.append({"path": r["path"], "split": r["split"], "mask": r["mask_source"], **image, **facts})
        table = pd.DataFrame(records)
        if table.empty:
            raise DataError(f"{self.cfg.data.path}: no images found (rule: a dataset needs images)")
        table["suffix_is_image"] = table["path"].map(lambda p: Path(p).suffix.lower() in IMAGE_SUFFIXES)
        table["size_matches"] = (table["width"] == table["mask_width"]) & (table["height"] == table["mask_height"])
        if "declared_width" in rows[0]:  # COCO: the JSON's size must be the file's size
            table["size_matches"] &= (table["width"] == [r["declared_width"] for r in rows]) & (
                table["height"] == [r["declared_height"] for r in rows]
            )
        table["mask_single_channel"] = table["mask_mode"].isin(INDEX_MODES)
        table["colors_declared"] = table["undeclared_colors"] == ""
        table["has_foreground"] = table["foreground_pixels"] > 0
        splits_per_hash = table.groupby("sha256")["split"].nunique()
        table["duplicate_in_other_split"] = table["sha256"].map(splits_per_hash).fillna(0).gt(1)
        pixels = pd.DataFrame(pixel_rows, columns=["split", "class", "pixels", "image"])
        freq = (
            pixels.groupby(["class", "split"], sort=False)
            .agg(pixels=("pixels", "sum"), images=("image", "sum"))
            .reset_index()
        )
        totals = freq.groupby("split")["pixels"].transform("sum")
        freq["fraction"] = (freq["pixels"] / totals.where(totals > 0, 1)).round(6)
        freq["class_split"] = [f"class '{c}' in split '{s}'" for c, s in zip(freq["class"], freq["split"])]
        return {"samples": table, "class_pixels": freq}

    def checks(self, tables: dict[str, pd.DataFrame]) -> list[Check]:
        import great_expectations as gx

        d, E = self.cfg.data, gx.expectations
        names = self.class_names()
        # sizes from the header (width > 0), so a decompression bomb refused before decoding breaks the size rule too
        sized = dict(row_condition="width > 0", condition_parser="pandas")
        decoded = dict(row_condition="decodes == True", condition_parser="pandas")
        mask_read = dict(row_condition="mask_decodes == True", condition_parser="pandas")
        out = [
            Check(
                "samples",
                "every file decodes as an image",
                E.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True]),
            ),
            Check(
                "samples",
                f"image width within [{d.min_size}, {d.max_size}]",
                E.ExpectColumnValuesToBeBetween(column="width", min_value=d.min_size, max_value=d.max_size, **sized),
            ),
            Check(
                "samples",
                f"image height within [{d.min_size}, {d.max_size}]",
                E.ExpectColumnValuesToBeBetween(column="height", min_value=d.min_size, max_value=d.max_size, **sized),
            ),
            Check(
                "samples",
                "every image has a mask file (same name under the masks folder)",
                E.ExpectColumnValuesToBeInSet(column="mask_exists", value_set=[True]),
                key_column="mask",
            ),
            Check(
                "samples",
                "every mask decodes (image file or COCO annotation)",
                E.ExpectColumnValuesToBeInSet(
                    column="mask_decodes",
                    value_set=[True],
                    row_condition="mask_exists == True",
                    condition_parser="pandas",
                ),
                key_column="mask",
            ),
            Check(
                "samples",
                "mask has the same height and width as its image",
                E.ExpectColumnValuesToBeInSet(
                    column="size_matches",
                    value_set=[True],
                    row_condition="mask_decodes == True and decodes == True",
                    condition_parser="pandas",
                ),
                key_column="mask",
            ),
            Check(
                "samples",
                f"mask values in the declared classes 0..{len(names) - 1} {names} "
                f"or the ignore index {self.ignore_index}",
                E.ExpectColumnValuesToBeInSet(
                    column="values_ok",
                    value_set=[True],
                    row_condition="mask_decodes == True and colors_declared == True",
                    condition_parser="pandas",
                ),
                key_column="mask",
            ),
            Check(
                "samples",
                "no identical image in two splits",
                E.ExpectColumnValuesToBeInSet(column="duplicate_in_other_split", value_set=[False]),
            ),
        ]
        if self.options["mask_color_mode"] == "reject":
            out.append(
                Check(
                    "samples",
                    "mask is single-channel class indices (palette and RGB masks are rejected: "
                    "data.options.mask_color_mode=reject)",
                    E.ExpectColumnValuesToBeInSet(column="mask_single_channel", value_set=[True], **mask_read),
                    key_column="mask",
                )
            )
        elif not self.options["colors"]:  # nothing declared: these files are not class-index masks at all
            out.append(
                Check(
                    "samples",
                    "mask is a single-channel class-index image (RGB or palette masks need "
                    "data.options.colors, or data.options.palette_as_index for VOC-style palette "
                    "PNGs; RGB files here usually mean data.options.masks_dir points at photos)",
                    E.ExpectColumnValuesToBeInSet(column="colors_declared", value_set=[True], **mask_read),
                    key_column="mask",
                )
            )
        else:
            out.append(
                Check(
                    "samples",
                    "palette / RGB mask colours are declared in data.options.colors (or data.options.ignore_color)",
                    E.ExpectColumnValuesToBeInSet(column="colors_declared", value_set=[True], **mask_read),
                    key_column="mask",
                )
            )
        if d.color_mode == "reject":
            out.append(
                Check(
                    "samples",
                    "image is RGB (grayscale, palette and RGBA are rejected: data.color_mode=reject)",
                    E.ExpectColumnValuesToBeInSet(column="mode", value_set=["RGB"], **decoded),
                )
            )
        return out

    def validation_notes(self, tables: dict[str, pd.DataFrame]) -> list[str]:
        s, notes = tables["samples"], []
        read = s[s["mask_decodes"]]
        notes += [
            f"{p}: no foreground pixels (mask {m} is all background or ignored)"
            for p, m in zip(read.loc[~read["has_foreground"], "path"], read.loc[~read["has_foreground"], "mask"])
        ]
        conv = read[read["mask_converted"]]
        notes += [
            f"{m}: {mode} mask converted to class indices through data.options.colors"
            for m, mode in zip(conv["mask"], conv["mask_mode"])
        ]
        if self.cfg.data.color_mode == "convert":
            odd = s[s["decodes"] & (s["mode"] != "RGB")]
            notes += [
                f"{p}: mode {m} converted to RGB (data.color_mode=convert)" for p, m in zip(odd["path"], odd["mode"])
            ]
        notes += [f"{m}: mask without an image (not used)" for m in self._read().orphan_masks]
        f = tables["class_pixels"]
        notes += [f"{r.class_split}: no pixels (its IoU there is undefined)" for r in f[f["pixels"] == 0].itertuples()]
        return notes

    def validation_summaries(self, tables: dict[str, pd.DataFrame]) -> dict[str, str]:
        f = tables["class_pixels"]
        if f.empty:
            return {}
        wide = f.pivot_table(index="class", columns="split", values=["fraction", "images"], sort=False)
        present = [s for s in SPLITS if s in f["split"].unique()]
        lines = [
            "| class | " + " | ".join(f"{s} pixels % | {s} images" for s in present) + " |",
            "|---|" + "---|---|" * len(present),
        ]
        for name in self.class_names():
            if name not in wide.index:
                continue
            cells = [
                f"{100 * wide.loc[name, ('fraction', s)]:.2f} | {int(wide.loc[name, ('images', s)])}" for s in present
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return {"Per-class pixel frequency": "\n".join(lines)}

    # ------------------------------------------------------------------ data
    def dataset(self, split: str, transforms) -> SegmentationDataset:
        rows = [r for r in self._samples() if r["split"] == split]
        return SegmentationDataset(rows, self.load_mask, transforms)

    def collate(self, batch: list):
        images = torch.stack([b[0].as_subclass(torch.Tensor) for b in batch])
        masks = torch.stack([b[1].as_subclass(torch.Tensor) for b in batch]).long()
        return images, masks

    # ------------------------------------------------------------ transforms
    def _cutout(self, c, size):
        return SegmentationCutout(c.mask_fill, self.ignore_index, p=c.p, scale=tuple(c.scale), value=0)

    def _uncovered_unlabelled(self, image_fill: int) -> dict:
        """Fill of the pixels a rotation or zoom-out uncovers: the image's fill value, and in the mask the ignore
        index, so they are not trained as class 0 (the background of the shapes, but the membrane of EM slices)."""
        return {tv_tensors.Image: image_fill, tv_tensors.Mask: self.ignore_index}

    def _rotation(self, c, size):
        return random_apply(v2.RandomRotation(degrees=c.degrees, fill=self._uncovered_unlabelled(c.fill)), c.p)

    def _rescale(self, c, size):
        return random_apply(v2.RandomAffine(degrees=0, scale=tuple(c.scale), fill=self._uncovered_unlabelled(0)), c.p)

    def train_transforms(self, augment: AugmentConfig | None, normalize):
        # v2 resizes, rotates and crops tv_tensors.Mask with nearest interpolation: no new label values
        builders = {"cutout": self._cutout, "rotation": self._rotation, "rescale": self._rescale}
        return build_transforms(
            self.cfg.image_size, augment, normalize, registry=with_builders(self.augmentations, builders)
        )

    def eval_transforms(self, normalize):
        return build_transforms(self.cfg.image_size, None, normalize)

    def batch_mixer(self, augment: AugmentConfig | None):
        return build_mixer(augment, len(self.class_names()), self.ignore_index)

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        m = self.cfg.model
        if m.name not in ARCHITECTURES:
            raise ValueError(
                f"model.name {m.name!r} is not a segmentation model; choose one of {sorted(ARCHITECTURES)}"
            )
        arch = ARCHITECTURES[m.name]
        if m.name == "unet" and m.options != SegmentationModelOptions():
            raise ValueError(
                "model.options are for torchvision segmentation models; the unet takes width, depth and dropout"
            )
        model = arch.build(len(self.class_names()), m)
        if m.weights == "imagenet":
            self.load_imagenet(model.encoder)
        elif m.weights.startswith("torchvision:"):
            load_into(model, torchvision_state_dict(m.name, m.weights.split(":", 1)[1]), m.weights, arch.head_prefixes)
        elif m.weights != "none":
            load_into(model, read_checkpoint(m.weights), m.weights, arch.head_prefixes)
        if m.freeze_backbone:
            for name, p in model.named_parameters():
                p.requires_grad = not name.startswith(arch.backbone_prefixes)
        freeze(model, m.frozen_layers)
        return model

    def pretrained_name(self) -> str | None:
        arch = ARCHITECTURES.get(self.cfg.model.name)
        return arch.pretrained(self.cfg.model) if arch else None

    def encoder_prefixes(self) -> tuple[str, ...]:
        return ARCHITECTURES[self.cfg.model.name].backbone_prefixes if self.pretrained_name() else ()

    def training_loss(self, model, images, targets):
        loss_fn = get_loss(self.cfg.train.loss.name)
        out, aux = model_outputs(model(images))
        loss = loss_fn(out, targets, self.cfg.train.loss)
        if aux is not None:  # torchvision's auxiliary head, weighted as in its reference scripts
            loss = loss + 0.5 * loss_fn(aux, targets, self.cfg.train.loss)
        return loss

    @torch.no_grad()
    def evaluate(self, model, loader, device, native: bool = False) -> EvalResult:
        """mIoU and friends; ``native``: each image's logits resized to its own size (as :meth:`predict_image`
        does) against its original mask, the predicted masks kept in ``extra["masks"]``; else at the training size."""
        model.eval()
        n = len(self.class_names())
        keep = self.cfg.options.overlay_samples
        cm = torch.zeros(n, n, dtype=torch.long)
        loss_sum, n_pixels, kept, native_masks = 0.0, 0, [], []
        dataset, order = in_order(loader.dataset)
        for images, masks in loader:
            logits, _ = model_outputs(model(images.to(device)))
            if len(kept) < keep:  # pictures at the training size: one grid size whatever the images' sizes
                kept += list(logits[: keep - len(kept)].argmax(1).to(torch.uint8).cpu())
            if native:
                pairs = []
                for k in range(len(images)):
                    truth = dataset.mask(order[len(native_masks) + len(pairs)]).long().to(device)[None]
                    pairs.append((to_size(logits[k : k + 1], truth.shape[-2:]), truth))
            else:
                pairs = [(logits, masks.to(device))]
            for scores, truth in pairs:
                loss_sum += F.cross_entropy(scores, truth, ignore_index=self.ignore_index, reduction="sum").item()
                n_pixels += int((truth != self.ignore_index).sum())
                pred = scores.argmax(1)
                cm += confusion(pred, truth, n, self.ignore_index)
                if native:
                    native_masks.append(pred[0].to(torch.uint8).cpu().numpy())
        result = self._score(cm)
        result.metrics["loss"] = loss_sum / max(n_pixels, 1)
        result.predictions = kept
        if native:
            result.extra["masks"] = native_masks  # one HxW class-index array per image, in the dataset's order
        return result

    counted_as = "images containing the class"

    def counted_classes(self) -> list[str]:
        return self.class_names()[1:]  # classes[0] is the background

    @torch.no_grad()
    def predict_image(self, model, image, normalize, image_id: int) -> Prediction:
        """A class-index mask at the image's own resolution: the logits at the training size are resized
        (bilinear) to the image's size, then the most likely class per pixel."""
        x = self.predict_transform(normalize)(image).as_subclass(torch.Tensor)[None]
        device = next(model.parameters()).device
        logits, _ = model_outputs(model.eval()(x.to(device)))
        mask = to_size(logits, (image.height, image.width)).argmax(1)[0].to(torch.uint8).cpu()
        names = self.class_names()
        counts = torch.bincount(mask.flatten().long(), minlength=len(names))
        record = {
            "image_id": image_id,
            **{f"pixels_{c}": round(float(n) / mask.numel(), 6) for c, n in zip(names, counts.tolist())},
        }
        present = [c for c, n in zip(names[1:], counts[1:].tolist()) if n > 0]  # classes[0] is the background
        rgb = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
        return Prediction([record], present, mask=mask.numpy(), overlay=self.overlay(rgb, mask)[0])

    def export_module(self, model):
        return LogitsOnly(model)

    def _score(self, cm: torch.Tensor) -> EvalResult:
        names = self.class_names()
        cm = cm.double()
        tp, gt, pr = cm.diag(), cm.sum(1), cm.sum(0)
        union = gt + pr - tp
        # a class absent from both truth and prediction has no IoU: left out of the means
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.nan)
        dice = torch.where(gt + pr > 0, 2 * tp / (gt + pr).clamp_min(1), torch.nan)
        per_class = pd.DataFrame(
            {
                "class": names,
                "iou": iou.numpy(),
                "dice": dice.numpy(),
                "precision": (tp / pr.clamp_min(1)).numpy(),
                "recall": (tp / gt.clamp_min(1)).numpy(),
                "true_pixels": gt.long().numpy(),
                "predicted_pixels": pr.long().numpy(),
            }
        )
        metrics = {
            "miou": float(iou.nanmean()) if (union > 0).any() else 0.0,
            "pixel_accuracy": float(tp.sum() / cm.sum().clamp_min(1)),
            "dice": float(dice.nanmean()) if (gt + pr > 0).any() else 0.0,
            "predicted_classes": int((pr > 0).sum()),  # 1: every pixel gets the same class
            **{f"iou/{c}": float(v) for c, v in zip(names, iou.tolist()) if v == v},
            **never_predicted(names, gt.tolist(), pr.tolist()),
        }
        return EvalResult(metrics, per_class=per_class, extra={"confusion_matrix": cm.long().numpy()})

    def dummy_result(self, train, evaluation) -> EvalResult:
        """Most frequent training class everywhere, scored against the original masks (each image's own size)."""
        n = len(self.class_names())
        counts = torch.zeros(n, dtype=torch.long)
        for i in range(len(train)):
            m = train.mask(i).long()
            counts += torch.bincount(m[m < n], minlength=n)
        most_frequent = int(counts.argmax())
        cm = torch.zeros(n, n, dtype=torch.long)
        for i in range(len(evaluation)):
            mask = evaluation.mask(i).long()
            cm += confusion(torch.full_like(mask, most_frequent), mask, n, self.ignore_index)
        result = self._score(cm)
        result.extra["most_frequent_class"] = self.class_names()[most_frequent]
        return result

    # ---------------------------------------------------------- visualisation
    def overlay(self, image, target) -> tuple[torch.Tensor, str]:
        """uint8 picture of the image with the mask's classes in their colours (ignored pixels white)."""
        from torchvision.utils import draw_segmentation_masks

        from cv_models.visualise import to_uint8

        target = target.as_subclass(torch.Tensor)
        text = ""
        if target.is_floating_point():  # MixUp's soft targets: draw the dominant class
            weight, target = target.max(0)
            labelled = weight[weight > 0]
            text = f"soft: top weight >= {float(labelled.min()) if labelled.numel() else 0:.2f}"
        target = target.long().squeeze(0)
        colors = self.colors()
        layers = torch.stack([target == k for k in range(1, len(colors))] + [target == self.ignore_index])
        picture = draw_segmentation_masks(to_uint8(image), layers, alpha=0.6, colors=colors[1:] + [(255, 255, 255)])
        return picture, text

    def draw(self, image, target):
        from cv_models.visualise import caption

        picture, text = self.overlay(image, target)
        return caption(picture.float() / 255, text)

    def report(self, results: dict[str, EvalResult], test, out_dir: Path) -> list[Path]:
        """Test images with the true masks and each model's predicted masks; per-class IoU table; the predicted
        masks at the images' own resolution (:meth:`_write_masks`)."""
        from cv_models.visualise import caption, save_grid

        files = []
        plain = self.dataset("test", self.eval_transforms(None))
        models = [name for name, res in results.items() if res.predictions]
        if models:
            n = min(len(results[name].predictions) for name in models)
            pictures = []
            for i in range(n):
                image, mask = plain[i]
                pictures.append(
                    caption(self.overlay(image, mask)[0].float() / 255, f"truth {Path(plain.samples[i]['path']).name}")
                )
                pictures += [
                    caption(self.overlay(image, results[name].predictions[i])[0].float() / 255, name) for name in models
                ]
            path = out_dir / "test_predictions.png"
            save_grid(pictures, path, nrow=1 + len(models))
            files.append(path)
        table = pd.concat(
            [res.per_class.assign(model=name) for name, res in results.items() if res.per_class is not None]
        )
        path = out_dir / "per_class_iou.csv"
        table.pivot_table(index="class", columns="model", values="iou", sort=False).to_csv(path)
        files.append(path)
        return files + self._write_masks(results, test, out_dir)

    def _write_masks(self, results: dict[str, EvalResult], test: SegmentationDataset, out_dir: Path) -> list[Path]:
        """Each model's predicted class-index PNGs and the ground truth they were scored against, at each image's
        own resolution, named after the image (``masks.csv`` lists them), and how to rescore them."""
        models = [name for name, res in results.items() if "masks" in res.extra]
        if not models:
            return []
        rows, used = [], set()
        for i, sample in enumerate(test.samples):
            stem = Path(sample["path"]).stem
            name = stem if stem not in used else f"{stem}_{i}"
            used.add(name)
            row = {"image": sample["path"], "ground_truth": f"ground_truth/{name}.png"}
            arrays = {"ground_truth": test.mask(i).numpy()} | {m: results[m].extra["masks"][i] for m in models}
            for m in models:
                row[m] = f"masks_{m}/{name}.png"
            for key, array in arrays.items():
                path = out_dir / row[key]
                path.parent.mkdir(exist_ok=True)
                Image.fromarray(array.astype(np.uint8)).save(path)
            rows.append(row)
        pd.DataFrame(rows).to_csv(out_dir / "masks.csv", index=False)
        n = len(self.class_names())
        (out_dir / "RECOMPUTE.md").write_text(
            f"# Rescoring the test masks\n\n`masks.csv` lists every test image with its ground truth "
            f"(`ground_truth/`: the class indices scored, {self.ignore_index} = unlabelled, left out) and each model's "
            f"predicted class indices (`masks_<model>/`), all at the image's own resolution. Classes 0..{n - 1}: "
            f"{self.class_names()}. mIoU over the classes present in the truth or the prediction, pixels summed over "
            f"all images (the dummy predicts its most frequent class everywhere: no files):\n\n```python\n"
            f"import numpy as np, pandas as pd\nfrom PIL import Image\n\n"
            f"rows = pd.read_csv('masks.csv')\ninter, union = np.zeros({n}), np.zeros({n})\n"
            f"for r in rows.itertuples():\n"
            f"    truth, pred = np.asarray(Image.open(r.ground_truth)), np.asarray(Image.open(r.augmented))\n"
            f"    valid = truth != {self.ignore_index}\n"
            f"    for k in range({n}):\n"
            f"        t, p = (truth == k) & valid, (pred == k) & valid\n"
            f"        inter[k] += (t & p).sum()\n        union[k] += (t | p).sum()\n"
            f"print('miou', (inter[union > 0] / union[union > 0]).mean())  # metrics.json: augmented.miou\n```\n"
        )
        return [out_dir / "masks.csv", out_dir / "RECOMPUTE.md"]
