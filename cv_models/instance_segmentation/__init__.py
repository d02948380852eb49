"""Instance segmentation: COCO JSON (polygon or RLE masks) or per-instance PNG folders, Mask R-CNN,
mask-aware augmentations (MixUp, CutMix, copy-paste), box and mask mAP with pycocotools.

Data (``data.format``):

* ``coco``: ``<path>/<data.options.annotations>`` (default ``annotations/{split}.json``, one file per
  split) with ``file_name`` relative to ``<path>/<data.options.images>`` (default ``images``). Masks as
  polygons, uncompressed RLE or compressed RLE; ``iscrowd`` annotations are left out (reported).
  Read by the detection task's COCO reader (:mod:`cv_models.data.coco`).
* ``instance_folders``: the microscopy layout, ``<path>/<id>/images/<id>.png`` and one binary PNG per
  instance in ``<path>/<id>/masks/`` (see :mod:`cv_models.data.instance_folder`); one class.

Samples are ``(image, target)`` with ``target = {"boxes": N x 4 xyxy, "labels": N (1..K),
"masks": N x H x W uint8, "image_id": int}`` at the training size. Boxes are recomputed from the
masks after every transform. The evaluate stage scores at each image's own resolution (predicted boxes
scaled, mask probabilities resized before thresholding, against the original masks); the per-epoch
validation at the training size.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision import tv_tensors

from pydantic import Field

from cv_models.augment import AUGMENTATIONS, BATCH, Augmentation, build_transforms, cutout_rectangle, with_builders
from cv_models.base import Check, CVTask, EvalResult, Prediction, in_order, register_task
from cv_models.data.coco import RESCORE_LINES, no_ground_truth_notes
from cv_models.data.instance_masks import BOX_TOLERANCE_FRACTION, BOX_TOLERANCE_PX, decode, read_png_mask
from cv_models.data.instances import add_mask_facts
from cv_models.data.probe import load_rgb
from cv_models.data.registry import reader
from cv_models.mix.instances import InstanceBatchMixer, MixOp, boxes_from_masks, tidy
from cv_models.nets.detectors import backbone_network, pretrained_trunk
from cv_models.nets.mask_rcnn import build_mask_rcnn
from cv_models.settings import AugmentConfig, AutoCount, Strict, Switch, task_settings
from cv_models.weights import freeze

COCO_STATS = ("map", "map50", "map75", "map50_maxdets100")  # reported for boxes and masks (and max_dets once)


# ---------------------------------------------------------------- settings (tasks.instance_segmentation)
class InstanceDataOptions(Strict):
    """``data.options`` of instance segmentation."""

    # coco: one file per split, file_name relative to `images`; None: "annotations/{split}.json"
    annotations: str | None = None
    # coco: the folder file names are relative to (None: "images"; "{split}" allowed, COCO train2017/);
    # yolo: the images folder template (None: "images/{split}", or the data_yaml's folders)
    images: str | None = None
    labels: str | None = None  # yolo: the label txt folder template (None: "labels/{split}")
    data_yaml: str | None = None  # yolo: an Ultralytics data.yaml (path, train, val, test, names)
    names: list[str] | dict[int, str] | None = None  # yolo: class names by id (else data.classes or the data_yaml's)
    splits: dict[str, str] | None = None  # names substituted for {split}; only some with data.split_from: seed
    keep_classes: list[str] | None = None  # coco, yolo: train on these of the dataset's classes only (others left out)
    class_name: str = "object"  # instance_folders: the one class (when data.classes is null)
    box_tolerance_px: float = Field(BOX_TOLERANCE_PX, ge=0)  # a stored box may differ from its mask's extent by this...
    box_tolerance_fraction: float = Field(BOX_TOLERANCE_FRACTION, ge=0)  # ...or this fraction of the box's longer side


class InstanceModelOptions(Strict):
    """``model.options`` of the Mask R-CNNs (the light one reads them all; torchvision's ResNet-50 ones the proposal knobs)."""

    backbone: str = "resnet18"  # tiny | resnet18 | resnet34 | resnet50
    backbone_weights: str = (
        "none"  # none | torchvision:DEFAULT (ImageNet backbone; not for tiny) | classifier checkpoint
    )
    fpn_channels: int = Field(64, ge=1)
    mask_head_layers: int = Field(2, ge=1)
    mask_head_channels: int | None = Field(None, ge=1)  # None: the FPN's channels
    representation_size: int = Field(256, ge=1)
    anchor_size: float = Field(16, gt=0)  # smallest anchor (pixels), doubling per FPN level
    aspect_ratios: list[float] = [0.5, 1.0, 2.0]
    scales_per_level: int = Field(1, ge=1)
    # auto: sized from the busiest training image (cv_models/sizing.py; the validation report states the values)
    rpn_pre_nms_top_n_train: AutoCount = "auto"
    rpn_post_nms_top_n_train: AutoCount = "auto"
    rpn_pre_nms_top_n_test: AutoCount = "auto"
    rpn_post_nms_top_n_test: AutoCount = "auto"
    rpn_batch_size_per_image: int = Field(64, ge=1)
    box_batch_size_per_image: int = Field(64, ge=1)  # RoIs sampled per image for the box and mask heads
    detections_per_img: AutoCount = "auto"
    score_thresh: float = Field(0.05, ge=0, le=1)


class InstanceAugmentOptions(Strict):
    min_area: int = Field(16, ge=0)  # instances under this many pixels after augmenting are removed
    min_visible: float = Field(0.25, ge=0, le=1)  # ... and those with less than this fraction of their area left


class InstanceAugment(AugmentConfig):
    copy_paste: Switch = Switch()  # instances of another image pasted on (batch level)
    options: InstanceAugmentOptions = InstanceAugmentOptions()


class InstanceOptions(Strict):
    report_images: int = Field(8, ge=0)  # test images drawn with ground truth and predicted masks
    draw_score_threshold: float = Field(0.5, ge=0, le=1)  # predict's overlays draw instances scoring at least this


SETTINGS = task_settings(
    "InstanceSegmentation",
    data_options=InstanceDataOptions,
    model_options=InstanceModelOptions,
    augment=InstanceAugment,
    options=InstanceOptions,
)


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


# ---------------------------------------------------------------- COCO scoring
def encode_mask(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_scores(gt: dict, results: list[dict], class_names: list[str]) -> tuple[dict[str, float], pd.DataFrame]:
    """Box and mask mAP@[.5:.95], mAP@.5 and mAP@.75 with pycocotools (the detection task's helper,
    once per IoU type), and per-class AP@.5 of boxes and masks."""
    from cv_models.data.coco import coco_map

    metrics, tables = {}, {}
    for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
        # pycocotools adds fields to the dicts it is given: score copies, export the originals
        m, per_class = coco_map(copy.deepcopy(gt), copy.deepcopy(results), class_names, iou_type)
        metrics.update({f"{prefix}_{k}": m[k] for k in COCO_STATS} | {"max_dets": m["max_dets"]})
        scored = per_class[per_class["n_boxes"] > 0]  # a class without ground truth has no AP (NaN in the table)
        metrics.update({f"{prefix}_ap50/{c}": float(v) for c, v in zip(scored["class"], scored["ap50"])})
        tables[prefix] = per_class
    per_class = pd.DataFrame(
        {
            "class": class_names,
            "mask_ap": tables["mask"]["ap"],
            "mask_ap50": tables["mask"]["ap50"],
            "box_ap": tables["box"]["ap"],
            "box_ap50": tables["box"]["ap50"],
            "gt_instances": tables["mask"]["n_boxes"],
        }
    )
    return metrics, per_class


def ground_truth_entries(target: dict, image_id: int, start_id: int) -> list[dict]:
    out = []
    for k, (mask, box, label) in enumerate(zip(target["masks"], target["boxes"], target["labels"])):
        m = mask.cpu().numpy().astype(bool)
        x0, y0, x1, y1 = [float(v) for v in box]
        out.append(
            {
                "id": start_id + k,
                "image_id": image_id,
                "category_id": int(label),
                "segmentation": encode_mask(m),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float(m.sum()),
                "iscrowd": 0,
            }
        )
    return out


def to_image_size(output: dict, size: tuple[int, int], image_size: tuple[int, int]) -> dict:
    """A Mask R-CNN output for an input of ``size`` (h, w) mapped to the image's own ``image_size`` (H, W):
    boxes scaled, mask probabilities resized (bilinear), so they are thresholded at 0.5 there."""
    import torch.nn.functional as F

    (h, w), (H, W) = size, image_size
    if (h, w) == (H, W):
        return output
    out = dict(output)
    out["boxes"] = output["boxes"] * torch.tensor([W / w, H / h, W / w, H / h])
    masks = output["masks"]
    out["masks"] = (
        F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=False)
        if len(masks)
        else torch.zeros((0, 1, H, W))
    )
    return out


def result_entries(output: dict, image_id: int, mask_threshold: float = 0.5) -> list[dict]:
    """Model output of one image as COCO results (boxes xywh, masks as compressed RLE)."""
    masks = (output["masks"][:, 0] > mask_threshold).cpu().numpy() if "masks" in output else None
    out = []
    for k, (box, label, score) in enumerate(
        zip(output["boxes"].tolist(), output["labels"].tolist(), output["scores"].tolist())
    ):
        x0, y0, x1, y1 = box
        out.append(
            {
                "image_id": image_id,
                "category_id": int(label),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(score),
                "segmentation": encode_mask(masks[k]),
            }
        )
    return out


# ---------------------------------------------------------------- the task
@register_task
class InstanceSegmentationTask(CVTask):
    name = "instance_segmentation"
    primary_metric = "mask_map50"
    settings = SETTINGS
    augmentations = {**AUGMENTATIONS, "copy_paste": Augmentation(BATCH)}
    export_outputs = ("boxes", "labels", "scores", "masks")  # masks: N x 1 x H x W probabilities
    export_batched = False

    # ------------------------------------------------------------------ data
    def _options(self) -> InstanceDataOptions:
        return self.cfg.data.options

    def _tables(self):
        """Images and annotations tables, read once: the format's reader (cv_models/data/instances.py) plus mask facts."""
        if not hasattr(self, "_cached_tables"):
            d, o = self.cfg.data, self._options()
            tables = reader(self.name, d.format)(d)
            self._reader_notes = tables.notes
            anns = add_mask_facts(tables.images, tables.annotations, o.box_tolerance_px, o.box_tolerance_fraction)
            self._cached_tables = (tables.images, anns, tables.categories)
        return self._cached_tables

    def class_names(self) -> list[str]:
        if self.cfg.data.options.keep_classes:  # data.classes then names the ids of a YOLO set, not the classes trained
            return list(self._tables()[2])
        if self.cfg.data.classes:
            return list(self.cfg.data.classes)
        return list(self._tables()[2])

    def validation_tables(self) -> dict[str, pd.DataFrame]:
        images, anns, _ = self._tables()
        return {"images": images, "annotations": anns.drop(columns=["segmentation"], errors="ignore")}

    def checks(self, tables: dict[str, pd.DataFrame]) -> list[Check]:
        import great_expectations as gx

        def all_true(table, column, rule):
            return Check(
                table,
                rule,
                gx.expectations.ExpectColumnValuesToBeInSet(column=column, value_set=[True]),
                key_column="item",
            )

        classes = self.class_names()
        out = [
            all_true("images", "path_inside", "file name stays inside the dataset folder"),
            Check(
                "images",
                "image file exists",
                gx.expectations.ExpectColumnValuesToBeInSet(column="exists", value_set=[True]),
                key_column="item_path",
            ),
            all_true("images", "decodes", "every image decodes"),
            all_true("images", "size_matches", "image size matches the declared width and height"),
            all_true("annotations", "image_present", "every annotation's image is listed"),
            all_true("annotations", "known_category", f"category is one of the known classes {classes}"),
            all_true("annotations", "decodes", "every mask decodes"),
            all_true("annotations", "polygon_ok", "polygons have at least 3 points (an even number of coordinates)"),
            all_true("annotations", "rle_sum_ok", "RLE counts add up to the image size (height*width)"),
            all_true("annotations", "png_binary", "instance PNG is binary (two values, background 0)"),
            all_true("annotations", "size_matches", "mask has the image's size"),
            all_true("annotations", "non_empty", "mask has a non-empty area"),
            all_true("annotations", "box_matches", "box matches the mask's extent (within the tolerance)"),
        ]
        if "one_image_file" in tables["images"]:
            out.append(all_true("images", "one_image_file", "an image folder holds exactly one file in images/"))
        return out

    def validation_notes(self, tables: dict[str, pd.DataFrame]) -> list[str]:
        images, anns = tables["images"], tables["annotations"]
        notes = list(getattr(self, "_reader_notes", []))
        notes += (
            [
                f"{item}: iscrowd annotation left out of training and evaluation"
                for item in anns.loc[anns["iscrowd"].astype(int) == 1, "item"]
            ]
            if len(anns)
            else []
        )
        empty = images[images["n_boxes"] == 0]
        if len(empty):
            notes.append(f"{len(empty)} image(s) without instances (kept as negatives), e.g. {empty['item'].iloc[0]}")
        return notes

    def validation_summaries(self, tables: dict[str, pd.DataFrame]) -> dict[str, str]:
        anns = tables["annotations"]
        if anns.empty:
            return {}
        table = (
            anns.groupby(["split", "category"])
            .agg(instances=("item", "size"), mean_area=("area", "mean"))
            .reset_index()
        )
        kinds = anns.groupby("kind").size().to_dict()
        lines = ["| split | class | instances | mean mask area (px) |", "|---|---|---|---|"]
        lines += [f"| {r.split} | {r.category} | {r.instances} | {r.mean_area:.0f} |" for r in table.itertuples()]
        from cv_models.sizing import describe

        return {
            "Instances per class": "\n".join(lines) + f"\n\nMask storage: {kinds}",
            "Settings sized from the data": describe(self.most_objects(), self.cfg.model.options),
        }

    def _split_tables(self, split: str):
        """The split's decodable images, the label of each kept class, and the split's usable annotations
        (no crowds, kept classes only): what both the training records and the crops read."""
        images, anns, _ = self._tables()
        label_of = {c: k + 1 for k, c in enumerate(self.class_names())}
        usable = anns[(anns["split"] == split) & (anns["iscrowd"].astype(int) == 0) & anns["category"].isin(label_of)]
        return images[(images["split"] == split) & images["decodes"]], label_of, usable

    def _records(self, split: str) -> list[dict]:
        images, label_of, usable = self._split_tables(split)
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

    def object_boxes(self, split: str) -> list[dict]:
        images, label_of, usable = self._split_tables(split)
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

    def dataset(self, split: str, transforms) -> InstanceDataset:
        return InstanceDataset(self._records(split), transforms)

    def collate(self, batch: list):
        images, targets = zip(*batch)
        if all(isinstance(i, torch.Tensor) for i in images) and len({tuple(i.shape) for i in images}) == 1:
            return torch.stack(images), list(targets)
        return list(images), list(targets)

    # ------------------------------------------------------------ transforms
    def _tidy(self) -> TidyInstances:
        o = self.cfg.augment.options
        return TidyInstances(o.min_area, o.min_visible)

    def train_transforms(self, augment: AugmentConfig | None, normalize):
        registry = with_builders(self.augmentations, {"cutout": lambda c, size: InstanceCutout(c.p, tuple(c.scale))})
        return build_transforms(self.cfg.image_size, augment, normalize, registry=registry, tail=[self._tidy()])

    def eval_transforms(self, normalize):
        return build_transforms(self.cfg.image_size, None, normalize, tail=[TidyInstances(1, 0.0)])

    def batch_mixer(self, augment: AugmentConfig | None):
        """Hand-written MixUp, CutMix and copy-paste (``augment.copy_paste``) for instances."""
        if augment is None:
            return None
        ops = [
            MixOp(name, c.p, c.alpha) for name, c in (("mixup", augment.mixup), ("cutmix", augment.cutmix)) if c.enabled
        ]
        if augment.copy_paste.enabled:
            ops.append(MixOp("copy_paste", augment.copy_paste.p, 1.0))
        if not ops:
            return None
        return InstanceBatchMixer(ops, augment.options.min_area, augment.options.min_visible)

    # ------------------------------------------------------------------ model
    def most_objects(self) -> int:
        """The largest number of instances in one training image: sizes the ``auto`` model settings."""
        _, anns, _ = self._tables()
        train = anns[(anns["split"] == "train") & (anns["iscrowd"].astype(int) == 0)] if len(anns) else anns
        return int(train.groupby("image_id").size().max()) if len(train) else 0

    def build_model(self) -> nn.Module:
        from cv_models.sizing import sized_options

        m = self.cfg.model
        options, _ = sized_options(m.options, self.most_objects())
        imagenet = m.weights == "imagenet"  # into the backbone's trunk; else weights of the whole model
        model = build_mask_rcnn(
            m.name, len(self.class_names()) + 1, self.cfg.image_hw, m.width, options, "none" if imagenet else m.weights
        )
        if imagenet:
            self.load_imagenet(pretrained_trunk(model.backbone))
        if m.freeze_backbone:
            for p in model.backbone.body.parameters():
                p.requires_grad = False
        freeze(model, m.frozen_layers)
        return model

    def pretrained_name(self) -> str | None:
        # the light maskrcnn takes model.options.backbone; torchvision's ResNet-50 ones their own whole-model weights
        return backbone_network(self.cfg.model.options.backbone) if self.cfg.model.name == "maskrcnn" else None

    def encoder_prefixes(self) -> tuple[str, ...]:
        return ("backbone.body.",) if self.pretrained_name() else ()

    def training_loss(self, model, images, targets):
        losses = model(list(images), [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets])
        return sum(losses.values())

    def categories(self) -> list[dict]:
        return [{"id": k + 1, "name": n} for k, n in enumerate(self.class_names())]

    def native_ground_truth(self, dataset: InstanceDataset, indices: list[int]) -> dict:
        """COCO ground truth of the records at ``indices``, at each image's own resolution (with file_name,
        width, height): the original masks, boxes from their extent. Decoded once per dataset object."""
        cache = dataset.__dict__.setdefault("_native_gt", {})
        images, anns = [], []
        for i in indices:
            r = dataset.records[i]
            if i not in cache:
                t = dataset.target(i, r["width"], r["height"])
                keep = t["masks"].flatten(1).sum(1) > 0  # as the evaluation's TidyInstances(1, 0): no empty instance
                plain = {
                    "masks": t["masks"].as_subclass(torch.Tensor)[keep],
                    "labels": t["labels"][keep],
                    "boxes": t["boxes"].as_subclass(torch.Tensor)[keep],
                }
                cache[i] = ground_truth_entries(plain, int(r["image_id"]), 0)
            images.append(
                {"id": int(r["image_id"]), "file_name": r["file_name"], "width": r["width"], "height": r["height"]}
            )
            anns += [{**a, "id": len(anns) + k + 1} for k, a in enumerate(cache[i])]
        return {"images": images, "annotations": anns, "categories": self.categories()}

    @torch.no_grad()
    def predict(self, model, loader, device, native: bool = False):
        """Ground truth and model results as COCO dicts: at each image's own resolution (``native``, as
        :meth:`predict_image` maps them) or at the training size (the per-epoch validation, cheaper)."""
        model.eval()
        dataset, order = in_order(loader.dataset)
        gt_images, gt_anns, results, seen = [], [], [], 0
        for images, targets in loader:
            outputs = model([im.to(device) for im in images])
            for image, target, output in zip(images, targets, outputs):
                image_id = int(target["image_id"])
                output = {k: v.cpu() for k, v in output.items()}
                if native:
                    r = dataset.records[order[seen]]
                    output = to_image_size(output, tuple(image.shape[-2:]), (r["height"], r["width"]))
                else:
                    h, w = image.shape[-2:]
                    gt_images.append({"id": image_id, "width": int(w), "height": int(h)})
                    gt_anns += ground_truth_entries(target, image_id, len(gt_anns) + 1)
                results += result_entries(output, image_id)
                seen += 1
        if native:
            return self.native_ground_truth(dataset, order), results
        return {"images": gt_images, "annotations": gt_anns, "categories": self.categories()}, results

    def export_module(self, model):
        from cv_models.detection import DetectionOutputs

        return DetectionOutputs(model, self.export_outputs)

    def predict_transform(self, normalize):
        return build_transforms(self.cfg.image_size, None, normalize)  # the evaluation's, without the targets' tidying

    @torch.no_grad()
    def predict_image(self, model, image, normalize, image_id: int) -> Prediction:
        """COCO results with compressed-RLE masks at the image's own resolution: mask probabilities at the
        training size are resized (bilinear) to the image's size, then thresholded at 0.5."""
        x = self.predict_transform(normalize)(image).as_subclass(torch.Tensor)
        device = next(model.parameters()).device
        out = {k: v.cpu() for k, v in model.eval()([x.to(device)])[0].items()}
        out = to_image_size(out, tuple(x.shape[-2:]), (image.height, image.width))
        names = self.class_names()
        records = result_entries(out, image_id)
        for r in records:
            r["category"] = names[r["category_id"] - 1]
        threshold = self.cfg.options.draw_score_threshold
        rgb = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
        overlay = self.draw(rgb, out, score_threshold=threshold, min_size=0)
        return Prediction(records, [r["category"] for r in records if r["score"] >= threshold], overlay=overlay)

    def _result(self, gt: dict, results: list[dict]) -> EvalResult:
        metrics, per_class = coco_scores(gt, results, self.class_names())
        return EvalResult(
            metrics=metrics,
            predictions=results,
            per_class=per_class,
            extra={"coco_gt": gt, "notes": no_ground_truth_notes(per_class, "gt_instances")},
        )

    def evaluate(self, model, loader, device, native: bool = False) -> EvalResult:
        return self._result(*self.predict(model, loader, device, native))

    def dummy_result(self, train: Dataset, evaluation: Dataset) -> EvalResult:
        """One box-shaped instance per image: the most frequent training class, centred, of the mean
        training instance size (relative to the image); scored at each image's own resolution."""
        images, anns, _ = self._tables()
        tr = anns[(anns["split"] == "train") & anns["decodes"] & anns["non_empty"]]
        sizes = images.drop_duplicates("split_image_id").set_index("split_image_id")
        label_of = {c: k + 1 for k, c in enumerate(self.class_names())}
        rel_w, rel_h, label = 0.25, 0.25, 1
        if len(tr):
            key = tr["split"] + "/" + tr["image_id"].astype(str)
            rel_w = float(((tr["x1"] - tr["x0"]) / key.map(sizes["width"])).mean())
            rel_h = float(((tr["y1"] - tr["y0"]) / key.map(sizes["height"])).mean())
            label = label_of.get(tr["category"].mode().iloc[0], 1)
        gt, results = self.native_ground_truth(evaluation, list(range(len(evaluation)))), []
        for im in gt["images"]:
            h, w, image_id = im["height"], im["width"], im["id"]
            bw, bh = max(1, round(rel_w * w)), max(1, round(rel_h * h))
            x0, y0 = (w - bw) // 2, (h - bh) // 2
            mask = np.zeros((h, w), dtype=bool)
            mask[y0 : y0 + bh, x0 : x0 + bw] = True
            results.append(
                {
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x0, y0, bw, bh],
                    "score": 1.0,
                    "segmentation": encode_mask(mask),
                }
            )
        return self._result(gt, results)

    # ---------------------------------------------------------- visualisation
    def draw(self, image: torch.Tensor, target, score_threshold: float = 0.5, min_size: int = 192) -> torch.Tensor:
        """Masks filled in per-class colours, boxes and class names; predictions below the score threshold
        hidden; small images enlarged (nearest) to ``min_size`` so the names stay legible."""
        from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

        from cv_models.visualise import to_uint8

        picture = to_uint8(image)
        masks, labels, boxes = target["masks"], target["labels"], target["boxes"]
        if masks.ndim == 4:  # model output: N x 1 x H x W probabilities
            masks = masks[:, 0] > 0.5
        keep = target["scores"] >= score_threshold if "scores" in target else torch.ones(len(labels), dtype=torch.bool)
        masks, labels, boxes = masks[keep].bool().cpu(), labels[keep].cpu(), boxes[keep].cpu().float()
        factor = -(-min_size // picture.shape[-1])  # ceil
        if factor > 1:
            picture = picture.repeat_interleave(factor, -1).repeat_interleave(factor, -2)
            masks = masks.repeat_interleave(factor, -1).repeat_interleave(factor, -2)
            boxes = boxes * factor
        if len(labels) == 0:
            return picture
        names = self.class_names()
        palette = [
            (230, 25, 75),
            (60, 180, 75),
            (0, 130, 200),
            (255, 225, 25),
            (145, 30, 180),
            (245, 130, 48),
            (70, 240, 240),
            (240, 50, 230),
        ]
        colours = [palette[(int(k) - 1) % len(palette)] for k in labels]
        picture = draw_segmentation_masks(picture, masks, alpha=0.45, colors=colours)
        text = [names[int(k) - 1] if 0 < int(k) <= len(names) else str(int(k)) for k in labels]
        if "scores" in target:
            text = [f"{t} {s:.2f}" for t, s in zip(text, target["scores"][keep].tolist())]
        return draw_bounding_boxes(picture, boxes, labels=text, colors=colours, width=1)

    def report(self, results: dict[str, EvalResult], test: Dataset, out_dir: Path) -> list[Path]:
        """COCO ground truth (file names, original sizes) and results JSON (RLE masks) per model, at the images'
        own resolution, how to rescore them, and predicted masks drawn on test images."""
        from cv_models.visualise import caption, save_grid

        files = []
        gt = next(iter(results.values())).extra["coco_gt"]
        files.append(out_dir / "coco_ground_truth.json")
        files[-1].write_text(json.dumps(gt))
        for name, res in results.items():
            path = out_dir / f"coco_results_{name}.json"
            path.write_text(json.dumps(res.predictions))
            files.append(path)
        files.append(out_dir / "RECOMPUTE.md")
        files[-1].write_text(
            "# Rescoring the test results\n\n`coco_ground_truth.json` (each test image's id, file_name and original "
            "width/height; masks as RLE) and `coco_results_<model>.json` (COCO results: boxes x, y, w, h in the original "
            "pixels, masks as compressed RLE) are at each image's own resolution. With pycocotools:\n\n```python\n"
            "from collections import Counter\n\nimport numpy as np\nfrom pycocotools.coco import COCO\nfrom pycocotools.cocoeval import COCOeval\n\n"
            "gt = COCO('coco_ground_truth.json')\ndt = gt.loadRes('coco_results_augmented.json')\n"
            "for iou_type in ('segm', 'bbox'):  # metrics.json: mask_map50 / mask_map, box_map50 / box_map\n"
            "    e = COCOeval(gt, dt, iou_type)\n"
            "    # as the pipeline: maxDets never below the busiest image (COCO's 100 would drop detections)\n"
            "    busiest = max((Counter(a['image_id'] for a in gt.dataset['annotations']) | "
            "Counter(r['image_id'] for r in dt.dataset['annotations'])).values())\n"
            "    e.params.maxDets = [1, 10, 100] + ([busiest] if busiest > 100 else [])  # metrics.json: max_dets\n"
            "    e.evaluate(); e.accumulate()\n    prefix = {'segm': 'mask_', 'bbox': 'box_'}[iou_type]\n    "
            + RESCORE_LINES.replace("\n", "\n    ").rstrip(" ")
            + "```\n"
        )
        n = min(self.cfg.options.report_images, len(test))
        if n == 0:
            return files
        pictures = []
        for r in test.records[:n]:  # drawn at the image's own size, as scored
            shown = torch.from_numpy(np.asarray(load_rgb(r["path"])).copy()).permute(2, 0, 1).float() / 255
            size = shown.shape[-2:]
            pictures.append(
                caption(
                    self.draw(shown, _coco_target(gt["annotations"], int(r["image_id"]), size)).float() / 255,
                    "ground truth",
                )
            )
            for name, res in results.items():
                pred = _coco_target(res.predictions, int(r["image_id"]), size)
                pictures.append(caption(self.draw(shown, pred).float() / 255, name))
        files.append(save_grid(pictures, out_dir / "predictions_test.png", nrow=1 + len(results)))
        return files


def _coco_target(results: list[dict], image_id: int, size) -> dict:
    """COCO results (or ground-truth annotations: no scores) of one image back to a drawable target (masks decoded from RLE)."""
    from pycocotools import mask as mask_utils

    mine = [r for r in results if r["image_id"] == image_id]
    h, w = size
    masks = [
        mask_utils.decode({"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()})
        for r in mine
    ]
    target = {
        "masks": torch.from_numpy(np.stack(masks)).bool() if masks else torch.zeros((0, h, w), dtype=torch.bool),
        "boxes": torch.tensor(
            [[x, y, x + bw, y + bh] for x, y, bw, bh in (r["bbox"] for r in mine)], dtype=torch.float32
        ).reshape(-1, 4),
        "labels": torch.tensor([r["category_id"] for r in mine], dtype=torch.int64),
    }
    if all("score" in r for r in mine) and mine:
        target["scores"] = torch.tensor([r["score"] for r in mine], dtype=torch.float32)
    return target
