"""The detection task's settings (``tasks.detection`` in params.yaml): the reader's layout and bad-box policy, the
light detectors' options, the box-aware augmentations' shared options and the report's."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cv_models.data.boxes import FORMAT_OPTIONS, TASK_OPTIONS
from cv_models.settings import AugmentConfig, AutoCount, DataConfig, Strict, Switch, task_settings


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
    # test-time augmentation of the evaluate stage and of predictions (not of validation during training): the
    # detections of the image flipped left-right (hflip: 2 views), also upside down (flips: 4), also transposed
    # (dihedral: 8; for data with no up or left, such as microscopy), fused box by box (cv_models/detection/tta.py)
    tta: Literal["none", "hflip", "flips", "dihedral"] = "none"


SETTINGS = task_settings(
    "Detection",
    data=DetectionData,
    data_options=DetectionDataOptions,
    model_options=DetectionModelOptions,
    augment=DetectionAugment,
    options=DetectionOptions,
)
