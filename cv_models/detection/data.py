"""Detection data: a split's records (usable images with their valid boxes) from the reader's tables, the Dataset
that loads them, and the collate function the detectors' list inputs need."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from cv_models.data.annotations import AnnotationTables
from cv_models.data.coco import to_coco_ground_truth
from cv_models.data.probe import load_rgb


class DetectionDataset(Dataset):
    """Samples ``(image, target)``; target: ``boxes`` (tv_tensors.BoundingBoxes, XYXY pixels), ``labels``
    (1..K, 0 is the background), ``image_id`` (int, for COCO evaluation)."""

    def __init__(self, records: list[dict], class_names: list[str], transforms, size: tuple[int, int] | None = None):
        self.records = records
        self.class_names = class_names
        self.transforms = transforms
        # (height, width): resize with PIL on load (cheaper than resizing tensors; the transforms' Resize is then a no-op)
        self.size = size
        self.by_id = {r["image_id"]: r for r in records}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        r = self.records[i]
        image = load_rgb(r["path"])
        keep = r["iscrowd"] == 0  # crowd / VOC-difficult boxes only matter to the evaluation
        boxes = r["boxes"][keep]
        if self.transforms is not None and self.size and image.size != self.size[::-1]:
            h, w = self.size
            boxes = boxes * torch.tensor([w / image.width, h / image.height] * 2)
            image = image.resize((w, h), Image.BILINEAR)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(image.height, image.width)),
            "labels": r["labels"][keep],
            "image_id": r["image_id"],
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def coco_ground_truth(self) -> dict:
        return to_coco_ground_truth(self.records, self.class_names)


def collate(batch):
    """Lists of images and targets (detectors take lists; sizes may differ); plain tensors."""
    images = [im.as_subclass(torch.Tensor) if isinstance(im, torch.Tensor) else im for im, _ in batch]
    targets = [
        {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for _, t in batch
    ]
    return images, targets


def split_records(tables: AnnotationTables, names: list[str], split: str) -> list[dict]:
    """The split's usable images (decoding, inside the dataset folder, first of a duplicated id) with their valid
    boxes, numbered 1..N in table order (the COCO image ids of the evaluation)."""
    label = {n: k + 1 for k, n in enumerate(names)}
    images = tables.images
    images = images[(images["split"] == split) & images["decodes"] & images["path_inside"]]
    images = images.drop_duplicates("split_image_id")
    boxes = tables.annotations
    if len(boxes):
        boxes = boxes[(boxes["split"] == split) & boxes["valid"]]
    grouped = dict(list(boxes.groupby("image_id"))) if len(boxes) else {}
    return [_record(n, im, grouped.get(im.image_id), label) for n, im in enumerate(images.itertuples(), start=1)]


def _record(n: int, im, b, label: dict[str, int]) -> dict:
    """One image's record: its file and original size, its boxes (XYXY pixels), labels and crowd flags."""
    return {
        "image_id": n,
        "source_id": im.image_id,
        "file_name": im.file_name,
        "path": im.path,
        "width": int(im.width),
        "height": int(im.height),
        "boxes": torch.tensor(b[["x0", "y0", "x1", "y1"]].to_numpy(np.float32))
        if b is not None
        else torch.zeros((0, 4)),
        "labels": torch.tensor([label[c] for c in b["category"]], dtype=torch.int64)
        if b is not None
        else torch.zeros(0, dtype=torch.int64),
        "iscrowd": torch.tensor(b["iscrowd"].to_numpy(np.int64))
        if b is not None
        else torch.zeros(0, dtype=torch.int64),
    }
