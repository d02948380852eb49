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

Modules: ``settings`` (the options schemas), ``data`` (tables, records, the Dataset, mask-aware transforms),
``validation`` (the validate stage's tables, rules, notes and summaries), ``scoring`` (COCO box and mask mAP),
``report`` (the evaluation report and pictures) and ``task`` (:class:`InstanceSegmentationTask`, registered
when this package is imported).
"""

from cv_models.instance_segmentation.data import InstanceCutout, InstanceDataset, TidyInstances
from cv_models.instance_segmentation.scoring import (
    COCO_STATS,
    coco_scores,
    encode_mask,
    ground_truth_entries,
    result_entries,
    to_image_size,
)
from cv_models.instance_segmentation.settings import (
    SETTINGS,
    InstanceAugment,
    InstanceAugmentOptions,
    InstanceDataOptions,
    InstanceModelOptions,
    InstanceOptions,
)
from cv_models.instance_segmentation.task import InstanceSegmentationTask

__all__ = [
    "COCO_STATS",
    "SETTINGS",
    "InstanceAugment",
    "InstanceAugmentOptions",
    "InstanceCutout",
    "InstanceDataOptions",
    "InstanceDataset",
    "InstanceModelOptions",
    "InstanceOptions",
    "InstanceSegmentationTask",
    "TidyInstances",
    "coco_scores",
    "encode_mask",
    "ground_truth_entries",
    "result_entries",
    "to_image_size",
]
