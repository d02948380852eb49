"""COCO JSON reader: images, boxes and categories as the shared annotation table, and the
polygon / RLE masks decoded with pycocotools when asked (instance segmentation reuses this).

One annotation file per split; ``file_name`` is relative to the images folder::

    <path>/annotations/{split}.json    (data.options.annotations, a template with {split})
    <path>/images/<file_name>          (data.options.images, also a template: "{split}" reads the
                                        standard COCO layout train2017/ + annotations/instances_train2017.json
                                        with data.options.splits: {train: train2017, val: val2017, ...})
"""
from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from cv_models.base import DataError
from cv_models.data.annotations import AnnotationTables, build_tables, check_split_names

DEFAULT_SPLITS = {"train": "train", "val": "val", "test": "test"}
# RECOMPUTE.md's lines after e.accumulate(): the reported APs from e.eval['precision'] at the maxDets used
# (summarize()'s stats[0] reads maxDets 100 whatever params.maxDets holds: -1 when the busiest image raised it)
# (``prefix``: metrics.json's prefix of the keys printed, '' for detection, box_ / mask_ for instance segmentation)
RESCORE_LINES = (
    "p, m = e.eval['precision'], len(e.params.maxDets) - 1  # [IoU .50:.05:.95, recall, class, area, maxDets]\n"
    "ap = lambda s: np.mean(s[s > -1]) if (s > -1).any() else float('nan')  # -1: no ground truth, left out\n"
    "print(prefix + 'map', ap(p[:, :, :, 0, m]))  # AP@[.5:.95] at the maxDets used\n"
    "print(prefix + 'map50', ap(p[0, :, :, 0, m]))\n"
    "print(prefix + 'map75', ap(p[5, :, :, 0, m]))\n"
    "print(prefix + 'map50_maxdets100', ap(p[0, :, :, 0, 2]))  # AP@.5 at maxDets 100, as summarize() and other tools print\n")


def load_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: annotation file does not exist (rule: every split has a COCO JSON file)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}) (rule: annotation file is valid COCO JSON)") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise DataError(f"{path}: not a COCO detection file (rule: a JSON object with lists 'images', 'annotations' "
                        f"and 'categories')")
    return data


def _field(path: Path, where: str, obj: dict, key: str, kind):
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{path}: {where} has no valid '{key}' (rule: COCO fields have the right type), got {value!r}")
    return value


def read_coco(root: Path, classes: list[str] | None = None, annotations: str = "annotations/{split}.json",
              images: str = "images", splits: dict[str, str] | None = None, with_masks: bool = False) -> AnnotationTables:
    """Read every split. ``classes`` declares the known class names (default: the train file's categories)."""
    splits = splits or DEFAULT_SPLITS
    check_split_names(splits, "coco")
    image_rows, box_rows, sources = [], [], {}
    categories: list[str] = []
    for split in [s for s in ("train", "val", "test") if s in splits]:  # the splits the mapping names
        path = root / annotations.format(split=splits[split])
        data = load_json(path)
        rel = path.relative_to(root) if root in path.parents else path
        sources[split] = str(path)
        id_to_name = {}
        for c in sorted(data["categories"], key=lambda c: c.get("id", 0) if isinstance(c, dict) else 0):
            cid = _field(path, "a category", c, "id", int)
            id_to_name[cid] = str(_field(path, f"category {cid}", c, "name", str))
        if split == "train":
            categories = list(id_to_name.values())
        files = {}
        for im in data["images"]:
            image_id = _field(path, "an image", im, "id", (int, str))
            name = _field(path, f"image {image_id}", im, "file_name", str)
            files[image_id] = name
            image_rows.append({"item": f"{rel}: image {image_id} ({name})", "split": split, "image_id": str(image_id),
                               "file_name": name, "image_root": root / images.format(split=splits[split]),
                               "declared_width": im.get("width") or 0,
                               "declared_height": im.get("height") or 0})
        for a in data["annotations"]:
            ann_id = a.get("id") if isinstance(a, dict) else None
            image_id = _field(path, f"annotation {ann_id}", a, "image_id", (int, str))
            cid = _field(path, f"annotation {ann_id}", a, "category_id", int)
            bbox = a.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
                raise DataError(f"{path}: annotation {ann_id} has no valid 'bbox' (rule: bbox is [x, y, width, height]), "
                                f"got {bbox!r}")
            x, y, w, h = map(float, bbox)
            name = files.get(image_id, f"<image id {image_id} not listed>")
            row = {"item": f"{rel}: annotation {ann_id} on {name}", "split": split, "ann_id": str(ann_id),
                   "image_id": str(image_id), "file_name": name, "category": id_to_name.get(cid, f"<unknown category id {cid}>"),
                   "x0": x, "y0": y, "x1": x + w, "y1": y + h, "iscrowd": int(a.get("iscrowd", 0) or 0),
                   "area": float(a.get("area") or w * h)}
            if with_masks:
                row["segmentation"] = a.get("segmentation")
            box_rows.append(row)
    known = list(classes) if classes else categories
    return build_tables(image_rows, box_rows, root / images, known, categories, sources)


def decode_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygon list, uncompressed or compressed RLE) as a bool HxW mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons: one flat [x0, y0, x1, y1, ...] list per part
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        counts = segmentation["counts"]
        rle = {"size": segmentation["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise DataError(f"unreadable COCO segmentation {str(segmentation)[:80]!r} (rule: polygon list or RLE dict)")
    return mask_utils.decode(rle).astype(bool)


def to_coco_ground_truth(records: list[dict], class_names: list[str]) -> dict:
    """A COCO ground-truth dict of dataset records (label k -> category id k), for pycocotools."""
    images, anns = [], []
    for r in records:
        images.append({"id": r["image_id"], "file_name": r["file_name"], "width": r["width"], "height": r["height"]})
        if "source_id" in r:  # the image's id in the dataset's own annotations (COCO id, VOC file stem)
            images[-1]["source_id"] = r["source_id"]
        for box, label, crowd in zip(r["boxes"].tolist(), r["labels"].tolist(), r["iscrowd"].tolist()):
            x0, y0, x1, y1 = box
            anns.append({"id": len(anns) + 1, "image_id": r["image_id"], "category_id": int(label),
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": int(crowd)})
    return {"images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(class_names)]}


def coco_max_dets(gt: dict, results: list[dict]) -> int:
    """COCO's maxDets for scoring: never below the busiest image (its objects or its detections, whichever are more).
    COCO's default, 100, would silently drop detections (and cap recall) on images with more objects."""
    per_image = Counter(r["image_id"] for r in results) | Counter(a["image_id"] for a in gt["annotations"])
    return max(100, max(per_image.values(), default=0))


def mean_precision(values: np.ndarray) -> float:
    """COCO's average of a slice of ``eval['precision']`` (or ``['recall']``): entries of -1 (a class without
    ground truth) left out; NaN, never 0, when nothing is left."""
    kept = values[values > -1]
    return float(np.mean(kept)) if kept.size else float("nan")


def coco_summary(ev, max_dets: int) -> dict[str, float]:
    """mAP@[.5:.95], mAP@.5, mAP@.75 at ``max_dets`` (area 'all') read from ``ev.eval['precision']``
    ([IoU, recall, class, area, maxDets]); AP@.5 and recall at maxDets 100 beside them, as other tools print.
    ``summarize()`` is not used: its stats[0] reads maxDets 100 whatever ``params.maxDets`` holds (-1 when 100 is
    not among them)."""
    p = ev.params
    precision, recall = ev.eval["precision"], ev.eval["recall"]
    at, at100 = p.maxDets.index(max_dets), p.maxDets.index(100)
    t50, t75 = (int(np.where(np.isclose(p.iouThrs, t))[0][0]) for t in (0.5, 0.75))
    return {"map": mean_precision(precision[:, :, :, 0, at]), "map50": mean_precision(precision[t50, :, :, 0, at]),
            "map75": mean_precision(precision[t75, :, :, 0, at]), "max_dets": max_dets,
            "map50_maxdets100": mean_precision(precision[t50, :, :, 0, at100]),
            "mar100": mean_precision(recall[:, :, 0, at100])}


def coco_map(gt: dict, results: list[dict], class_names: list[str], iou_type: str = "bbox") -> tuple[dict[str, float], pd.DataFrame]:
    """pycocotools' COCOeval (``iou_type`` bbox, or segm for masks) at maxDets = :func:`coco_max_dets` (stated as
    ``max_dets``): mAP@[.5:.95], mAP@.5, mAP@.75, AP@.5 at maxDets 100, mAR@100 and per-class AP / AP@.5.
    A class without ground truth in ``gt`` has no AP: NaN in the table and left out of the metrics
    (:func:`no_ground_truth_notes`); with no ground truth at all every AP is NaN, never 0."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    max_dets = coco_max_dets(gt, results)
    n_boxes = [sum(a["category_id"] == k + 1 for a in gt["annotations"]) for k in range(len(class_names))]
    per_class = pd.DataFrame({"class": class_names, "ap": 0.0, "ap50": 0.0, "n_boxes": n_boxes})
    per_class.loc[per_class["n_boxes"] == 0, ["ap", "ap50"]] = float("nan")
    if not results or not gt["annotations"]:  # nothing detected: AP 0 where there was something to find
        nothing = 0.0 if gt["annotations"] else float("nan")
        metrics = {"map": nothing, "map50": nothing, "map75": nothing, "max_dets": max_dets,
                   "map50_maxdets100": nothing, "mar100": nothing}
        return with_per_class(metrics, per_class), per_class
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.maxDets = [1, 10, 100] + ([max_dets] if max_dets > 100 else [])
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # [IoU thresholds, recall, class, area range, max dets]
    t50 = int(np.where(np.isclose(ev.params.iouThrs, 0.5))[0][0])
    for k, cid in enumerate(ev.params.catIds):
        row = per_class["class"] == class_names[cid - 1]
        per_class.loc[row, "ap"] = mean_precision(precision[:, :, k, 0, -1])
        per_class.loc[row, "ap50"] = mean_precision(precision[t50, :, k, 0, -1])
    return with_per_class(coco_summary(ev, max_dets), per_class), per_class


def with_per_class(metrics: dict, per_class: pd.DataFrame) -> dict:
    """``metrics`` with ``ap50/<class>`` and ``ap/<class>`` of every class that has ground truth (the others have no
    AP: :func:`no_ground_truth_notes` names them)."""
    scored = per_class[per_class["n_boxes"] > 0]
    return {**metrics, **{f"ap50/{c}": float(v) for c, v in zip(scored["class"], scored["ap50"])},
            **{f"ap/{c}": float(v) for c, v in zip(scored["class"], scored["ap"])}}


def no_ground_truth_notes(per_class: pd.DataFrame, count: str = "n_boxes") -> list[str]:
    """A line naming the classes without ground truth in the scored split (their AP is absent, not 0)."""
    missing = per_class.loc[per_class[count] == 0, "class"].tolist()
    if not missing:
        return []
    return [(f"no ground truth for {', '.join(missing)} in this split: no AP for {'it' if len(missing) == 1 else 'them'} "
             f"(NaN in the per-class table, left out of the metrics, not counted as 0)")]
