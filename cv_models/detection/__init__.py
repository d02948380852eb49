"""Object detection: COCO JSON, Pascal VOC XML or Ultralytics YOLO txt boxes, torchvision's Faster R-CNN (two-stage) or
RetinaNet (single-stage) on a light FPN backbone, box-aware augmentations, COCO mAP via pycocotools.

Primary metric: ``map50`` (COCO AP at IoU 0.5). It is the PASCAL VOC measure (BCCD is a VOC dataset),
the figure the targets are stated in, and less noisy than mAP@[.5:.95] on the small validation splits
that pick the best checkpoint of a short CPU training. ``map`` (AP@[.5:.95]) is reported beside it.

Images are not normalised by the transforms: the detectors normalise inside
(``GeneralizedRCNNTransform``) with the training split's per-channel mean and std from normstats.

The package's modules: ``settings`` (the options schemas), ``data`` (records, Dataset, collate), ``transforms``
(box-aware augmentations, the batch mixer), ``validation`` (tables, checks, notes, summaries), ``model`` (building,
weights, anchors sized to the boxes, the export wrapper), ``scoring`` (COCO results and mAP), ``report`` (the
evaluation's files and pictures) and ``task`` (:class:`DetectionTask`, registered on import).
"""

from __future__ import annotations

from cv_models.data.coco import coco_map, no_ground_truth_notes
from cv_models.detection.data import DetectionDataset, collate
from cv_models.detection.model import DetectionOutputs
from cv_models.detection.scoring import coco_results
from cv_models.detection.scoring import coco_results as _coco_results
from cv_models.detection.settings import (
    SETTINGS,
    DetectionAugment,
    DetectionAugmentOptions,
    DetectionData,
    DetectionDataOptions,
    DetectionModelOptions,
    DetectionOptions,
)
from cv_models.detection.task import DetectionTask
from cv_models.detection.transforms import BoxCutout
from cv_models.detection.validation import MAX_NOTES

__all__ = [
    "MAX_NOTES",
    "SETTINGS",
    "BoxCutout",
    "DetectionAugment",
    "DetectionAugmentOptions",
    "DetectionData",
    "DetectionDataOptions",
    "DetectionDataset",
    "DetectionModelOptions",
    "DetectionOptions",
    "DetectionOutputs",
    "DetectionTask",
    "_coco_results",
    "coco_map",
    "coco_results",
    "collate",
    "no_ground_truth_notes",
]
