"""Object detection: COCO JSON, Pascal VOC XML or Ultralytics YOLO txt boxes, torchvision's Faster R-CNN (two-stage) or
RetinaNet (single-stage) on a light FPN backbone, box-aware augmentations, COCO mAP via pycocotools.

Primary metric: ``map50`` (COCO AP at IoU 0.5). It is the PASCAL VOC measure (BCCD is a VOC dataset),
the figure the targets are stated in, and less noisy than mAP@[.5:.95] on the small validation splits
that pick the best checkpoint of a short CPU training. ``map`` (AP@[.5:.95]) is reported beside it.

Images are not normalised by the transforms: the detectors normalise inside
(``GeneralizedRCNNTransform``) with the training split's per-channel mean and std from normstats.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from pydantic import Field, model_validator

from cv_models.augment import AUGMENTATIONS, BATCH, Augmentation, build_transforms, cutout_rectangle, with_builders
from cv_models.base import Check, CVTask, EvalResult, Prediction, register_task
from cv_models.data.annotations import BOX_RULES, AnnotationTables, invalid_box_findings
from cv_models.data.boxes import FORMAT_OPTIONS, TASK_OPTIONS
from cv_models.data.coco import (
    RESCORE_LINES,
    coco_map,
    no_ground_truth_notes,  # noqa: F401 (coco_map re-exported)
    to_coco_ground_truth,
)
from cv_models.data.probe import load_rgb
from cv_models.data.registry import reader
from cv_models.pretrained import input_convention
from cv_models.settings import AugmentConfig, AutoCount, DataConfig, Strict, Switch, task_settings
from cv_models.weights import freeze

MAX_NOTES = 200


# ------------------------------------------------------------------ settings (tasks.detection in params.yaml)
class DetectionDataOptions(Strict):
    """``data.options``: the reader's layout (None = the format's own default) and the bad-box policy."""

    invalid_boxes: Literal["fail", "drop"] = (
        "fail"  # fail: invalid boxes stop the run | drop: left out; reported either way
    )
    keep_classes: list[str] | None = None  # train on these of the dataset's classes only (others' boxes left out)
    # coco: "annotations/{split}.json" | voc: the XML folder, "Annotations" ("{split}" allowed)
    annotations: str | None = None
    # folder the file names are relative to (coco: images | voc: JPEGImages | yolo: "images/{split}");
    # "{split}" allowed (COCO train2017/)
    images: str | None = None
    # names substituted for {split}, e.g. {train: trainval, val: val, test: test}; only some with data.split_from: seed
    splits: dict[str, str] | None = None
    split_files: str | None = None  # voc: "ImageSets/Main/{split}.txt"
    image_suffix: str | None = None  # voc: ".jpg"
    data_yaml: str | None = None  # yolo: an Ultralytics data.yaml (path, train, val, test, names)
    labels: str | None = None  # yolo: the label txt folder template, "labels/{split}"
    names: list[str] | dict[int, str] | None = None  # yolo: class names by id (else data.classes or the data_yaml's)


class DetectionData(DataConfig):
    options: DetectionDataOptions = DetectionDataOptions()

    @model_validator(mode="after")
    def _options_of_format(self):
        if self.format in FORMAT_OPTIONS:
            # None means "not given" (a saved model's settings list every option, unset ones as None)
            foreign = [
                k
                for k in self.options.model_fields_set
                if k not in TASK_OPTIONS
                and k not in FORMAT_OPTIONS[self.format]
                and getattr(self.options, k) is not None
            ]
            if foreign:
                raise ValueError(
                    f"options {foreign} are not read by format {self.format!r} "
                    f"(it reads {list(FORMAT_OPTIONS[self.format])})"
                )
        return self


class DetectionModelOptions(Strict):
    """``model.options`` of the light detectors (fasterrcnn, retinanet); ``kwargs`` for other torchvision builders."""

    backbone: str = "tiny"  # tiny | resnet18 | resnet34 | resnet50 (BatchNorm, FPN on strides 8-32)
    backbone_weights: str = "none"  # none | torchvision:DEFAULT | a classifier checkpoint (models/pretrain/backbone.pt)
    fpn_channels: int = Field(64, ge=1)
    anchor_size: float | Literal["auto"] = (
        "auto"  # pixels on the finest level, doubling per level; auto: sized to the train boxes
    )
    aspect_ratios: list[float] | Literal["auto"] = (
        "auto"  # anchor height / width, e.g. [0.5, 1.0, 2.0]; auto: train boxes' percentiles
    )
    scales_per_level: int | None = Field(
        None, ge=1
    )  # anchor sizes per level; None: the detector's (fasterrcnn 1, retinanet 2)
    # auto: sized from the busiest training image (cv_models/sizing.py; the validation report states the values)
    rpn_pre_nms_top_n_train: AutoCount = "auto"
    rpn_post_nms_top_n_train: AutoCount = "auto"
    rpn_pre_nms_top_n_test: AutoCount = "auto"
    rpn_post_nms_top_n_test: AutoCount = "auto"
    rpn_batch_size_per_image: int = Field(64, ge=1)
    box_batch_size_per_image: int = Field(64, ge=1)
    representation_size: int = Field(256, ge=1)
    detections_per_img: AutoCount = "auto"  # max(20, 2 x most objects in one training image); COCO maxDets follows
    score_thresh: float = Field(0.05, ge=0, le=1)
    head_norm: bool = True  # retinanet: GroupNorm in the heads
    box_loss: Literal["giou", "l1", "smooth_l1", "ciou", "diou"] = "giou"  # retinanet's box regression loss
    topk_candidates: int = Field(200, ge=1)  # retinanet
    kwargs: dict[str, Any] = {}  # a torchvision detection builder by name (model.name): its extra keyword arguments


class DetectionAugmentOptions(Strict):
    """``augment.options``: settings the box-aware augmentations share."""

    min_visible: float = Field(0.3, ge=0, le=1)  # mosaic / cutmix: drop boxes with less of their area left
    min_side: float = Field(2.0, ge=0)  # ... or a side thinner than this (pixels)
    cutout_min_visible: float = Field(0.3, ge=0, le=1)  # cutout: drop boxes with less of their area left
    fill: int = Field(127, ge=0, le=255)  # zoom-out (rescale) background


class DetectionAugment(AugmentConfig):
    mosaic: Switch = Switch()  # 4 images around a random centre, boxes clipped to their quadrant (batch level)
    options: DetectionAugmentOptions = DetectionAugmentOptions()


class DetectionOptions(Strict):
    report_images: int = Field(16, ge=0)  # test images drawn with their predicted boxes
    draw_score_threshold: float = Field(0.5, ge=0, le=1)


SETTINGS = task_settings(
    "Detection",
    data=DetectionData,
    data_options=DetectionDataOptions,
    model_options=DetectionModelOptions,
    augment=DetectionAugment,
    options=DetectionOptions,
)


# ------------------------------------------------------------------ dataset
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


# ------------------------------------------------------------ augmentations
class BoxCutout(nn.Module):
    """Erase one random rectangle (RandomErasing's sampling) and remove the boxes it mostly covers."""

    def __init__(self, p: float, scale: tuple[float, float], min_visible: float, value: float = 0.5):
        super().__init__()
        self.p, self.scale, self.min_visible, self.value = p, scale, min_visible, value

    def forward(self, image, target):
        if torch.rand(()) >= self.p:
            return image, target
        from cv_models.mix.detection import drop_covered

        _, H, W = image.shape
        y0, x0, h, w = cutout_rectangle(H, W, self.scale)
        out = image.clone()
        out[:, y0 : y0 + h, x0 : x0 + w] = self.value
        boxes = target["boxes"]
        plain = {
            "boxes": boxes.as_subclass(torch.Tensor),
            "labels": target["labels"],
            "weights": torch.ones(len(target["labels"])),
        }
        kept = drop_covered(plain, (x0, y0, x0 + w, y0 + h), self.min_visible)
        new_boxes = tv_tensors.wrap(kept["boxes"], like=boxes)
        return tv_tensors.wrap(out, like=image), {**target, "boxes": new_boxes, "labels": kept["labels"]}


def _detection_overrides(size: tuple[int, int], augment: AugmentConfig) -> dict[str, Callable]:
    """Box-aware versions of the shared registry's entries (boxes move with the image in all of them)."""
    o = augment.options
    fill = {tv_tensors.Image: o.fill, "others": 0}

    def maybe(t, p):
        return t if p >= 1 else v2.RandomApply([t], p=p)

    return {
        "crop": lambda c, s: maybe(
            v2.Compose([v2.RandomIoUCrop(min_scale=c.scale[0], max_scale=c.scale[1]), v2.Resize(s, antialias=True)]),
            c.p,
        ),
        "rescale": lambda c, s: maybe(
            v2.Compose(
                [
                    v2.RandomZoomOut(fill=fill, side_range=(1.0, max(c.scale[1], 1.0 + 1e-3)), p=1.0),
                    v2.Resize(s, antialias=True),
                ]
            ),
            c.p,
        ),
        "rotation": lambda c, s: maybe(
            v2.RandomRotation(degrees=c.degrees, fill={tv_tensors.Image: c.fill, "others": 0}), c.p
        ),
        "cutout": lambda c, s: BoxCutout(c.p, tuple(c.scale), o.cutout_min_visible),
    }


class DetectionOutputs(nn.Module):
    """One image in (3 x H x W float in [0, 1], the training size), the detections of it out as plain tensors: what torchvision's
    detectors export to ONNX and TorchScript as (their documented export takes a list of images)."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, image: torch.Tensor):
        out = self.model([image])[0]
        return tuple(out[k] for k in self.keys)


# ------------------------------------------------------------------ task
@register_task
class DetectionTask(CVTask):
    name = "detection"
    primary_metric = "map50"
    settings = SETTINGS
    augmentations = {**AUGMENTATIONS, "mosaic": Augmentation(BATCH)}
    export_outputs = ("boxes", "labels", "scores")
    export_batched = False
    normalizes_inside = True

    # ------------------------------------------------------------------ data
    def _policy(self) -> str:
        return self.cfg.data.options.invalid_boxes

    def tables(self) -> AnnotationTables:
        if not hasattr(self, "_tables"):  # read and probe once per task object (cv_models/data/boxes.py)
            self._tables = reader(self.name, self.cfg.data.format)(self.cfg.data)
        return self._tables

    def class_names(self) -> list[str]:
        if self.cfg.data.options.keep_classes:  # data.classes then names the ids of a YOLO set, not the classes trained
            return self.tables().categories
        return list(self.cfg.data.classes) if self.cfg.data.classes else self.tables().categories

    def validation_tables(self) -> dict[str, pd.DataFrame]:
        t = self.tables()
        return {"images": t.images, "annotations": t.annotations.drop(columns=["segmentation"], errors="ignore")}

    def checks(self, tables: dict[str, pd.DataFrame]) -> list[Check]:
        import great_expectations as gx

        E = gx.expectations
        # drop: the box rules report every invalid box but pass, the boxes are left out of training
        mostly = 1.0 if self._policy() == "fail" else 0.0
        classes = self.class_names()
        out = [
            Check(
                "images",
                "file name stays inside the dataset folder (no '..', no absolute path)",
                E.ExpectColumnValuesToBeInSet(column="path_inside", value_set=[True]),
                key_column="item",
            ),
            Check(
                "images",
                "image file exists",
                E.ExpectColumnValuesToBeInSet(
                    column="exists", value_set=[True], row_condition="path_inside == True", condition_parser="pandas"
                ),
                key_column="item_path",
            ),
            Check(
                "images",
                "image file decodes",
                E.ExpectColumnValuesToBeInSet(
                    column="decodes", value_set=[True], row_condition="exists == True", condition_parser="pandas"
                ),
                key_column="item",
            ),
            Check(
                "images",
                "image size matches the annotation's width and height",
                E.ExpectColumnValuesToBeInSet(column="size_matches", value_set=[True]),
                key_column="item",
            ),
            Check(
                "images",
                "image id unique within its split",
                E.ExpectColumnValuesToBeUnique(column="split_image_id"),
                key_column="item",
            ),
        ]
        rules = dict(BOX_RULES, known_category=f"category is one of the known classes {classes}")
        out += [
            Check(
                "annotations",
                rule,
                E.ExpectColumnValuesToBeInSet(column=col, value_set=[True], mostly=mostly),
                key_column="item",
            )
            for col, rule in rules.items()
        ]
        return out

    def validation_notes(self, tables: dict[str, pd.DataFrame]) -> list[str]:
        images, boxes = tables["images"], tables["annotations"]
        empty = images[images["n_boxes"] == 0]
        notes = list(self.tables().notes)
        if len(empty):
            notes.append(
                f"{len(empty)} image(s) without boxes (reported, not fatal; they train as background): "
                + ", ".join(empty["item"].head(20))
                + (" ..." if len(empty) > 20 else "")
            )
        if self._policy() == "drop" and len(boxes):
            findings = invalid_box_findings(boxes)
            notes += [f"dropped (data.options.invalid_boxes=drop): {f}" for f in findings[:MAX_NOTES]]
            if len(findings) > MAX_NOTES:
                notes.append(f"... and {len(findings) - MAX_NOTES} more dropped boxes (see annotations.csv)")
        return notes

    def validation_summaries(self, tables: dict[str, pd.DataFrame]) -> dict[str, str]:
        images, boxes = tables["images"], tables["annotations"]
        per_split = images.groupby("split").agg(
            images=("item", "size"), without_boxes=("n_boxes", lambda s: int((s == 0).sum()))
        )
        lines = ["| split | images | images without boxes |", "|---|---|---|"]
        lines += [f"| {s} | {r.images} | {r.without_boxes} |" for s, r in per_split.iterrows()]
        out = {"Images per split": "\n".join(lines)}
        if len(boxes):
            counts = boxes.groupby(["category", "split"]).size().unstack(fill_value=0)
            lines = ["| class | " + " | ".join(counts.columns) + " |", "|---|" + "---|" * len(counts.columns)]
            lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in counts.iterrows()]
            out["Boxes per class and split"] = "\n".join(lines)
        from cv_models.sizing import describe

        out["Settings sized from the data"] = describe(self.most_objects(), self.cfg.model.options)
        return out

    def object_boxes(self, split: str) -> list[dict]:
        return [{**r, "boxes": r["boxes"].tolist(), "labels": r["labels"].tolist()} for r in self.records(split)]

    def records(self, split: str) -> list[dict]:
        """The split's usable images with their valid boxes (invalid ones are dropped: with
        invalid_boxes=fail validation has already stopped the run if there were any)."""
        key = ("_records", split)
        if key in self.__dict__:
            return self.__dict__[key]
        t = self.tables()
        names = self.class_names()
        label = {n: k + 1 for k, n in enumerate(names)}
        images = t.images[(t.images["split"] == split) & t.images["decodes"] & t.images["path_inside"]]
        images = images.drop_duplicates("split_image_id")
        boxes = t.annotations
        if len(boxes):
            boxes = boxes[(boxes["split"] == split) & boxes["valid"]]
        grouped = dict(list(boxes.groupby("image_id"))) if len(boxes) else {}
        out = []
        for n, im in enumerate(images.itertuples(), start=1):
            b = grouped.get(im.image_id)
            out.append(
                {
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
            )
        self.__dict__[key] = out
        return out

    def dataset(self, split: str, transforms) -> DetectionDataset:
        return DetectionDataset(self.records(split), self.class_names(), transforms, size=self.cfg.image_hw)

    def collate(self, batch):
        return collate(batch)

    # ------------------------------------------------------------ transforms
    def train_transforms(self, augment: AugmentConfig | None, normalize):
        # ``normalize`` is not applied: the detector normalises inside (see build_model)
        size = self.cfg.image_hw
        registry = (
            with_builders(self.augmentations, _detection_overrides(size, augment)) if augment is not None else None
        )
        return build_transforms(size, augment, None, registry=registry, tail=[v2.SanitizeBoundingBoxes(min_size=1)])

    def eval_transforms(self, normalize):
        return build_transforms(self.cfg.image_size, None, None)  # evaluation reads the boxes from the records

    def batch_mixer(self, augment: AugmentConfig | None):
        if augment is None:
            return None
        from cv_models.mix.detection import DetectionMixer

        o = augment.options
        mixer = DetectionMixer(
            mixup_p=augment.mixup.p if augment.mixup.enabled else 0.0,
            mixup_alpha=augment.mixup.alpha,
            mosaic_p=augment.mosaic.p if augment.mosaic.enabled else 0.0,
            cutmix_p=augment.cutmix.p if augment.cutmix.enabled else 0.0,
            cutmix_alpha=augment.cutmix.alpha,
            min_visible=o.min_visible,
            min_side=o.min_side,
        )
        return mixer if max(mixer.mixup_p, mixer.mosaic_p, mixer.cutmix_p) > 0 else None

    # ------------------------------------------------------------------ model
    def input_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std the detector normalises with (from the normstats stage), or the input
        convention of its pretrained backbone's weights (model.weights: imagenet)."""
        if self.uses_imagenet_convention():
            c = input_convention(self.pretrained_name())
            return list(c.mean), list(c.std)
        mode = self.cfg.normalization
        if mode == "none":
            return [0.0] * 3, [1.0] * 3
        if mode == "mean_image":
            raise ValueError(
                "detection normalises inside the detector with per-channel statistics: set "
                "normalization to per_channel_std, per_channel_mean or none (mean_image needs one image size)"
            )
        # the normstats stage's output (tasks.paths.outputs layout; cv_models does not import tasks)
        path = Path(self.normstats_dir or Path("outputs") / self.name / "normstats") / "stats.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the normstats stage first (dvc repro)")
        stats = json.loads(path.read_text())
        std = stats["per_channel_std"] if mode == "per_channel_std" else [1.0] * 3
        return list(stats["per_channel_mean"]), list(std)

    def most_objects(self) -> int:
        """The largest number of (valid) objects in one training image: sizes the ``auto`` settings."""
        return max((len(r["boxes"]) for r in self.records("train")), default=0)

    def model_options(self) -> DetectionModelOptions:
        """A copy of ``model.options`` (sized: cv_models/sizing.py) with ``anchor_size: auto`` / ``aspect_ratios: auto``
        replaced by anchors sized to the training boxes at the training size (the same split gives the same anchors
        at evaluation)."""
        from cv_models.sizing import sized_options

        o, _ = sized_options(self.cfg.model.options, self.most_objects())
        auto = [k for k in ("anchor_size", "aspect_ratios") if getattr(o, k) == "auto"]
        if not auto:
            return o
        from cv_models.nets.detectors import (
            ANCHOR_LAYOUT,
            DEFAULT_ANCHOR_SIZE,
            DEFAULT_ASPECT_RATIOS,
            anchor_shapes,
            anchors_sized_to,
            best_anchor_iou,
        )

        name = self.cfg.model.name
        if name not in ANCHOR_LAYOUT:
            raise ValueError(f"model.options {auto} 'auto' is for the detectors {sorted(ANCHOR_LAYOUT)}, not {name!r}")
        levels, default_scales = ANCHOR_LAYOUT[name]
        scales = o.scales_per_level or default_scales
        h, w = self.cfg.image_hw
        sizes = [
            (r["boxes"][:, 2:] - r["boxes"][:, :2]) * torch.tensor([w / r["width"], h / r["height"]])
            for r in self.records("train")
            if len(r["boxes"])
        ]
        sizes = torch.cat(sizes) if sizes else torch.zeros((0, 2))
        fitted = anchors_sized_to(sizes, levels, scales)
        o = o.model_copy(update={k: fitted[k] for k in auto})
        if not getattr(self, "_anchors_reported", False):  # once per task object (evaluation rebuilds the model)
            before = best_anchor_iou(
                sizes, anchor_shapes(DEFAULT_ANCHOR_SIZE, levels, scales, DEFAULT_ASPECT_RATIOS)
            ).mean()
            print(
                f"[{self.name}] anchors sized to the training boxes at {h}x{w} px: anchor_size={o.anchor_size}, "
                f"aspect_ratios={o.aspect_ratios}; mean best-anchor IoU "
                f"{fitted['mean_best_iou']:.3f} (the defaults, {DEFAULT_ANCHOR_SIZE} px and {DEFAULT_ASPECT_RATIOS}: "
                f"{before:.3f}), boxes with a best anchor at IoU >= 0.5: {fitted['recall_at_iou_0.5']:.1%}"
            )
            self._anchors_reported = True
        return o

    def inference_config(self):
        """The class list, and anchors sized to the data ('auto') replaced by the sizes they resolved to."""
        cfg = super().inference_config()
        return cfg.model_copy(update={"model": cfg.model.model_copy(update={"options": self.model_options()})})

    @torch.no_grad()
    def predict_image(self, model, image, normalize, image_id: int) -> Prediction:
        """COCO results of one image, boxes in the image's own pixels (as the evaluation exports them)."""
        h, w = self.cfg.image_hw
        x = self.predict_transform(None)(image.resize((w, h), Image.BILINEAR) if image.size != (w, h) else image)
        device = next(model.parameters()).device
        out = model.eval()([x.as_subclass(torch.Tensor).to(device)])[0]
        sx, sy = image.width / x.shape[-1], image.height / x.shape[-2]
        boxes = out["boxes"].cpu() * torch.tensor([sx, sy, sx, sy])
        names = self.class_names()
        records = _coco_results(image_id, boxes, out["scores"].cpu(), out["labels"].cpu())
        for r in records:
            r["category"] = names[r["category_id"] - 1]
        threshold = self.cfg.options.draw_score_threshold
        objects = [r["category"] for r in records if r["score"] >= threshold]
        rgb = v2.functional.to_image(image).float() / 255
        overlay = self.draw(
            rgb,
            {"boxes": boxes, "labels": out["labels"].cpu(), "scores": out["scores"].cpu()},
            min_size=0,
            score_threshold=threshold,
        )
        return Prediction(records, objects, overlay=overlay)

    def export_module(self, model):
        return DetectionOutputs(model, self.export_outputs)

    def build_model(self) -> nn.Module:
        from cv_models.nets.detectors import DETECTORS, build_detector, head_prefixes, make_weighted, pretrained_trunk
        from cv_models.weights import load_into, read_checkpoint, torchvision_state_dict

        m, t = self.cfg.model, self.cfg.train
        if t.num_threads:  # the detectors thrash with more threads than free cores
            torch.set_num_threads(t.num_threads)
        mean, std = self.input_stats()
        n = len(self.class_names()) + 1  # + background
        size = self.cfg.image_hw
        if m.name in DETECTORS:
            model = build_detector(m.name, n, size, mean, std, m.width, self.model_options())
        else:  # any torchvision detection builder, e.g. fasterrcnn_mobilenet_v3_large_fpn
            from torchvision.models import get_model

            try:
                model = get_model(
                    m.name,
                    weights=None,
                    weights_backbone=None,
                    num_classes=n,
                    min_size=min(size),
                    max_size=max(size),
                    image_mean=mean,
                    image_std=std,
                    **m.options.kwargs,
                )
            except (ValueError, TypeError) as err:
                raise ValueError(f"model.name {m.name!r}: {err}") from None
            make_weighted(model)
        heads = head_prefixes(model)
        # pretrained weights: everything but the class-dependent head loads; the head is rebuilt for our classes
        if m.weights == "imagenet":  # ImageNet weights into the backbone's trunk (the FPN and heads are new)
            self.load_imagenet(pretrained_trunk(model.backbone))
        elif m.weights.startswith("torchvision:"):
            load_into(model, torchvision_state_dict(m.name, m.weights.split(":", 1)[1]), m.weights, head_prefixes=heads)
        elif m.weights != "none":
            load_into(model, read_checkpoint(m.weights), m.weights, head_prefixes=heads)
        if m.freeze_backbone:
            for name, p in model.named_parameters():
                p.requires_grad = not name.startswith("backbone.body.")
        freeze(model, m.frozen_layers)
        return model

    def pretrained_name(self) -> str | None:
        from cv_models.nets.detectors import DETECTORS, backbone_network

        # the registry's detectors take model.options.backbone; torchvision's built-by-name ones have their own
        return backbone_network(self.cfg.model.options.backbone) if self.cfg.model.name in DETECTORS else None

    def encoder_prefixes(self) -> tuple[str, ...]:
        return ("backbone.body.",) if self.pretrained_name() else ()

    def training_loss(self, model, images, targets):
        losses = model(images, targets)
        return sum(losses.values())

    @torch.no_grad()
    def evaluate(self, model, loader, device, native: bool = False) -> EvalResult:
        """COCO mAP with every box mapped back to its image's original pixels, always (``native`` or not): the
        boxes scale exactly, so the per-epoch validation costs nothing more for it."""
        model.eval()
        dataset = loader.dataset
        results = []
        for images, targets in loader:
            outputs = model([im.to(device) for im in images])
            for out, t, im in zip(outputs, targets, images):
                rec = dataset.by_id[t["image_id"]]
                sx, sy = rec["width"] / im.shape[-1], rec["height"] / im.shape[-2]  # back to the original pixels
                boxes = out["boxes"].cpu() * torch.tensor([sx, sy, sx, sy])
                results += _coco_results(rec["image_id"], boxes, out["scores"].cpu(), out["labels"].cpu())
        return self.score(dataset, results)

    def subset(self, dataset: DetectionDataset, indices: list[int]) -> DetectionDataset:
        return type(dataset)([dataset.records[i] for i in indices], dataset.class_names, dataset.transforms)

    def score(self, dataset: DetectionDataset, results: list[dict]) -> EvalResult:
        gt = dataset.coco_ground_truth()
        metrics, per_class = coco_map(gt, results, self.class_names())
        return EvalResult(
            metrics,
            predictions=results,
            per_class=per_class,
            extra={"ground_truth": gt, "notes": no_ground_truth_notes(per_class)},
        )

    def dummy_result(self, train, evaluation) -> EvalResult:
        """One centred box of the training boxes' mean relative size and the most frequent class, per image."""
        rel, labels = [], Counter()
        for r in train.records:
            b = r["boxes"]
            if len(b):
                rel.append(torch.stack([(b[:, 2] - b[:, 0]) / r["width"], (b[:, 3] - b[:, 1]) / r["height"]], 1))
                labels.update(r["labels"].tolist())
        rw, rh = torch.cat(rel).mean(0).tolist() if rel else (0.5, 0.5)
        label = labels.most_common(1)[0][0] if labels else 1
        results = []
        for r in evaluation.records:
            w, h = rw * r["width"], rh * r["height"]
            box = torch.tensor(
                [[(r["width"] - w) / 2, (r["height"] - h) / 2, (r["width"] + w) / 2, (r["height"] + h) / 2]]
            )
            results += _coco_results(r["image_id"], box, torch.ones(1), torch.tensor([label]))
        return self.score(evaluation, results)

    # ---------------------------------------------------------- visualisation
    def display_image(self, image, normalize):
        return image  # never normalised by the transforms

    def draw(self, image, target, min_size: int = 192, score_threshold: float = 0.0):
        """Boxes with class names (and mixing weight or score below 1) on the image, upscaled for legibility."""
        from torchvision.utils import draw_bounding_boxes

        from cv_models.visualise import to_uint8

        names = ["background"] + self.class_names()
        pic = to_uint8(image)
        boxes = target["boxes"].detach().cpu().float().reshape(-1, 4)
        scale = max(1.0, min_size / max(pic.shape[-2:]))
        if scale > 1:
            pic = torch.nn.functional.interpolate(pic[None].float(), scale_factor=scale, mode="nearest")[0].to(
                torch.uint8
            )
            boxes = boxes * scale
        score = target.get("scores", target.get("weights"))
        keep = torch.ones(len(boxes), dtype=torch.bool) if score is None else score.cpu() >= score_threshold
        labels = []
        for k, lab in enumerate(target["labels"].tolist()):
            text = names[lab] if 0 <= lab < len(names) else str(lab)
            if score is not None and float(score[k]) < 0.995:
                text += f" {float(score[k]):.2f}"
            labels.append(text)
        labels = [lab for lab, k in zip(labels, keep.tolist()) if k]
        palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
        colors = [palette[(lab - 1) % len(palette)] for lab, k in zip(target["labels"].tolist(), keep.tolist()) if k]
        if not keep.any():
            return pic
        return draw_bounding_boxes(pic, boxes[keep], labels=labels, colors=colors, width=2)

    def report(self, results: dict[str, EvalResult], test, out_dir: Path) -> list[Path]:
        """COCO ground truth (file names, original sizes) and COCO results JSON per model in the original pixels
        (recompute with pycocotools: RECOMPUTE.md), predictions drawn."""
        from cv_models.visualise import save_grid

        files = [out_dir / "ground_truth_test.json"]
        gt = test.coco_ground_truth()
        files[0].write_text(json.dumps(gt))
        threshold = self.cfg.options.draw_score_threshold
        n = min(self.cfg.options.report_images, len(test))
        for model_name, res in results.items():
            path = out_dir / f"predictions_{model_name}.json"
            path.write_text(json.dumps(res.predictions))
            files.append(path)
            if model_name == "dummy" or n == 0:
                continue
            pictures = []
            for rec in test.records[:n]:
                image = v2.functional.to_image(load_rgb(rec["path"])).float() / 255
                preds = [p for p in res.predictions if p["image_id"] == rec["image_id"]]
                boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (p["bbox"] for p in preds)]).reshape(-1, 4)
                pictures.append(
                    self.draw(
                        image,
                        {
                            "boxes": boxes,
                            "labels": torch.tensor([p["category_id"] for p in preds], dtype=torch.int64),
                            "scores": torch.tensor([p["score"] for p in preds]),
                        },
                        score_threshold=threshold,
                    )
                )
            files.append(save_grid(pictures, out_dir / f"predictions_{model_name}.png", nrow=4))
        (out_dir / "RECOMPUTE.md").write_text(
            "# Rescoring the test results\n\n`ground_truth_test.json` (each test image's id, file_name, original "
            "width/height and source_id, its id in the dataset's own annotations) and `predictions_<model>.json` (COCO results: boxes x, y, w, h in the original pixels) "
            "are at each image's own resolution. With pycocotools:\n\n```python\n"
            "from collections import Counter\n\nimport numpy as np\nfrom pycocotools.coco import COCO\nfrom pycocotools.cocoeval import COCOeval\n\n"
            "gt = COCO('ground_truth_test.json')\ndt = gt.loadRes('predictions_augmented.json')\n"
            "e = COCOeval(gt, dt, 'bbox')\n"
            "# as the pipeline: maxDets never below the busiest image (COCO's 100 would drop detections)\n"
            "busiest = max((Counter(a['image_id'] for a in gt.dataset['annotations']) | "
            "Counter(r['image_id'] for r in dt.dataset['annotations'])).values())\n"
            "e.params.maxDets = [1, 10, 100] + ([busiest] if busiest > 100 else [])  # metrics.json: max_dets\n"
            "e.evaluate(); e.accumulate()\nprefix = ''  # metrics.json: map, map50, ...\n" + RESCORE_LINES + "```\n"
        )
        return files


def _coco_results(image_id: int, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """COCO results entries, rounded as exported (so the exported file scores exactly the reported mAP)."""
    out = []
    for (x0, y0, x1, y1), s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        out.append(
            {
                "image_id": int(image_id),
                "category_id": int(lab),
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "score": round(float(s), 5),
            }
        )
    return out
