"""Instance segmentation data: the tables read once through the format's reader, the training records and crop
boxes built from them, the Dataset that decodes masks on access, and the transforms that keep masks and boxes
together (cutout on the masks too, boxes recomputed from the masks at the end of every pipeline)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from cv_models.augment import cutout_rectangle
from cv_models.data.instance_masks import decode, read_png_mask
from cv_models.data.instances import add_mask_facts
from cv_models.data.probe import load_rgb
from cv_models.data.registry import reader
from cv_models.mix.instances import boxes_from_masks, tidy

Tables = tuple[pd.DataFrame, pd.DataFrame, list[str]]  # images, annotations (with mask facts), categories


# ---------------------------------------------------------------- transforms
class InstanceCutout:
    """Cutout that also erases the patch from every instance mask, so a covered instance shrinks
    (and is removed by :class:`TidyInstances` when little of it is left)."""

    def __init__(self, p: float, scale: tuple[float, float]):
        self.p, self.scale = p, scale

    def __call__(self, image, target):
        if torch.rand(()) >= self.p:
            return image, target
        h, w = image.shape[-2:]
        y0, x0, ch, cw = cutout_rectangle(h, w, self.scale)  # as every task's cutout samples it
        image = image.clone()
        image[..., y0 : y0 + ch, x0 : x0 + cw] = 0  # 0 = the mean after normalisation
        masks = target["masks"].clone()
        masks[..., y0 : y0 + ch, x0 : x0 + cw] = 0
        return image, {**target, "masks": tv_tensors.wrap(masks, like=target["masks"])}


class TidyInstances:
    """Last step of every pipeline: plain tensors, boxes from the (transformed) masks, instances that
    became tiny (under ``min_area`` pixels) or mostly hidden (under ``min_visible`` of their area
    before the transforms) removed."""

    def __init__(self, min_area: int, min_visible: float):
        self.min_area, self.min_visible = min_area, min_visible

    def __call__(self, image, target):
        masks = target["masks"].as_subclass(torch.Tensor).to(torch.uint8)
        before = target.get("area_before")
        plain = {
            "masks": masks,
            "labels": target["labels"],
            "boxes": boxes_from_masks(masks),
            "image_id": target["image_id"],
        }
        if before is not None:  # geometric transforms rescale: compare in the same units (fraction of the image)
            scale = masks.shape[-1] * masks.shape[-2] / float(target["size_before"])
            before = before.float() * scale
        return image.as_subclass(torch.Tensor), tidy(plain, before, self.min_area, self.min_visible)


# ---------------------------------------------------------------- dataset
class InstanceDataset(Dataset):
    """Images with their instance masks, decoded on access (one image in memory at a time)."""

    def __init__(self, records: list[dict], transforms):
        self.records = records
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.records)

    def target(self, i: int, width: int, height: int) -> dict:
        r = self.records[i]
        masks = [
            read_png_mask(a["png"]) if a.get("png") else decode(a["segmentation"], height, width)
            for a in r["instances"]
        ]
        stack = (
            torch.from_numpy(np.stack(masks)).to(torch.uint8)
            if masks
            else torch.zeros((0, height, width), dtype=torch.uint8)
        )
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes_from_masks(stack), format="XYXY", canvas_size=(height, width)),
            "masks": tv_tensors.Mask(stack),
            "labels": torch.tensor([a["label"] for a in r["instances"]], dtype=torch.int64),
            "image_id": int(r["image_id"]),
            "area_before": stack.flatten(1).sum(1),
            "size_before": height * width,
        }

    def __getitem__(self, i: int):
        image = load_rgb(self.records[i]["path"])
        target = self.target(i, image.width, image.height)
        if self.transforms is not None:
            return self.transforms(image, target)
        return image, target


# ---------------------------------------------------------------- tables and records
def read_tables(name: str, data) -> tuple[Tables, list[str]]:
    """Images and annotations tables through the format's reader (cv_models/data/instances.py) plus mask facts,
    and the reader's notes."""
    o = data.options
    tables = reader(name, data.format)(data)
    anns = add_mask_facts(tables.images, tables.annotations, o.box_tolerance_px, o.box_tolerance_fraction)
    return (tables.images, anns, tables.categories), tables.notes


def split_tables(tables: Tables, class_names: list[str], split: str):
    """The split's decodable images, the label of each kept class, and the split's usable annotations
    (no crowds, kept classes only): what both the training records and the crops read."""
    images, anns, _ = tables
    label_of = {c: k + 1 for k, c in enumerate(class_names)}
    usable = anns[(anns["split"] == split) & (anns["iscrowd"].astype(int) == 0) & anns["category"].isin(label_of)]
    return images[(images["split"] == split) & images["decodes"]], label_of, usable


def records(images: pd.DataFrame, label_of: dict[str, int], usable: pd.DataFrame) -> list[dict]:
    """One record per image (numeric id, path, file name, size) with its instances (label and PNG or COCO mask)."""
    by_image: dict[str, list[dict]] = {}
    for a in usable.to_dict("records"):
        inst = {"label": label_of[a["category"]]}
        if isinstance(a.get("png"), str):
            inst["png"] = a["png"]
        else:
            inst["segmentation"] = a["segmentation"]
        by_image.setdefault(str(a["image_id"]), []).append(inst)
    out = []
    for im in images.to_dict("records"):
        numeric = int(im["image_id"]) if str(im["image_id"]).isdigit() else len(out) + 1
        out.append(
            {
                "image_id": numeric,
                "path": im["path"],
                "file_name": im["file_name"],
                "width": int(im["width"]),
                "height": int(im["height"]),
                "instances": by_image.get(str(im["image_id"]), []),
            }
        )
    return out


def object_boxes(images: pd.DataFrame, label_of: dict[str, int], usable: pd.DataFrame) -> list[dict]:
    """One entry per image with its instances' boxes and labels (what the crops stage cuts)."""
    by_image = dict(list(usable.groupby(usable["image_id"].astype(str))))
    out = []
    for im in images.drop_duplicates("split_image_id").to_dict("records"):
        a = by_image.get(str(im["image_id"]))
        out.append(
            {
                "path": im["path"],
                "image_id": len(out) + 1,
                "file_name": im["file_name"],
                "boxes": [] if a is None else a[["x0", "y0", "x1", "y1"]].to_numpy(float).tolist(),
                "labels": [] if a is None else [label_of[c] for c in a["category"]],
            }
        )
    return out


def collate(batch: list):
    """Images stacked when they share one size, else a list; targets as a list."""
    images, targets = zip(*batch)
    if all(isinstance(i, torch.Tensor) for i in images) and len({tuple(i.shape) for i in images}) == 1:
        return torch.stack(images), list(targets)
    return list(images), list(targets)


def most_objects(anns: pd.DataFrame) -> int:
    """The largest number of instances in one training image: sizes the ``auto`` model settings."""
    train = anns[(anns["split"] == "train") & (anns["iscrowd"].astype(int) == 0)] if len(anns) else anns
    return int(train.groupby("image_id").size().max()) if len(train) else 0
