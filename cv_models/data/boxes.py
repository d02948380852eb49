"""Detection readers: the boxes of COCO JSON, Pascal VOC XML or Ultralytics YOLO txt (``data.format``) as the
shared annotation tables (:mod:`cv_models.data.annotations`), with ``data.options.keep_classes`` and the splits
applied. The settings are the detection task's ``data.options`` (cv_models/detection/)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from cv_models.base import DataError
from cv_models.data.annotations import AnnotationTables, select_and_split
from cv_models.data.coco import read_coco
from cv_models.data.registry import Reader, register
from cv_models.data.voc import read_voc
from cv_models.data.yolo import read_yolo

# data.options the task reads itself, whatever the format (the others are passed to the format's reader)
TASK_OPTIONS = ("invalid_boxes", "keep_classes")
# which data.options each format reads (a key set for another format is an error, not ignored)
FORMAT_OPTIONS: dict[str, tuple[str, ...]] = {
    "coco": ("annotations", "images", "splits"),
    "voc": ("annotations", "images", "splits", "split_files", "image_suffix"),
    "yolo": ("data_yaml", "images", "labels", "splits", "names"),
}


def _boxes_reader(read: Callable[..., AnnotationTables]) -> Reader:
    """The detection reader around a file reader: the format's options given (None = the reader's default)."""

    def read_boxes(data) -> AnnotationTables:
        opts = {k: v for k, v in data.options.model_dump(exclude=set(TASK_OPTIONS)).items() if v is not None}
        try:
            tables = read(Path(data.path), classes=data.classes, **opts)
        except TypeError as err:
            raise DataError(f"data.options for format {data.format!r}: {err}") from None
        return select_and_split(tables, data, data.options.keep_classes)

    return read_boxes


read_coco_boxes = register("detection", "coco")(_boxes_reader(read_coco))
read_voc_boxes = register("detection", "voc")(_boxes_reader(read_voc))
read_yolo_boxes = register("detection", "yolo")(_boxes_reader(read_yolo))
