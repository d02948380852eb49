"""Semantic segmentation: image folders with same-named PNG class-index masks, or COCO JSON
rasterised to class masks; a U-Net or torchvision's FCN / DeepLabV3 / LRASPP; mIoU.

Class ``k`` of ``data.classes`` is mask value ``k``; ``classes[0]`` is the background.
Pixels equal to ``train.loss.ignore_index`` (default 255) are unlabelled: left out of the loss
and the metrics. Reader settings live in ``data.options`` (see params.yaml).

The modules: settings.py (the schema), data.py (listing, masks, dataset, mask-aware augmentations), networks.py
(the architectures), validation.py (the validate stage's tables and rules), report.py (scoring, pictures, report
files) and task.py (:class:`SegmentationTask`, registered when this package is imported).
"""

from cv_models.segmentation.data import SegmentationCutout, SegmentationDataset
from cv_models.segmentation.networks import ARCHITECTURES, Architecture, LogitsOnly, model_outputs, to_size
from cv_models.segmentation.report import PALETTE, confusion
from cv_models.segmentation.settings import (
    SETTINGS,
    SegmentationAugment,
    SegmentationCutoutAug,
    SegmentationDataOptions,
    SegmentationModelOptions,
    SegmentationOptions,
)
from cv_models.segmentation.task import SegmentationTask

__all__ = [
    "ARCHITECTURES",
    "PALETTE",
    "SETTINGS",
    "Architecture",
    "LogitsOnly",
    "SegmentationAugment",
    "SegmentationCutout",
    "SegmentationCutoutAug",
    "SegmentationDataOptions",
    "SegmentationDataset",
    "SegmentationModelOptions",
    "SegmentationOptions",
    "SegmentationTask",
    "confusion",
    "model_outputs",
    "to_size",
]
