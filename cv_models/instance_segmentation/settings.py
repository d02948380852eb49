"""The instance segmentation settings under ``tasks.instance_segmentation`` of params.yaml (pydantic)."""

from __future__ import annotations

from pydantic import Field

from cv_models.data.instance_masks import BOX_TOLERANCE_FRACTION, BOX_TOLERANCE_PX
from cv_models.settings import AugmentConfig, AutoCount, Strict, Switch, task_settings


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
