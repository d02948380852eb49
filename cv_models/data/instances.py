"""Instance segmentation readers (``data.format``): COCO JSON (polygon or RLE masks), Ultralytics YOLO polygon txt,
or per-instance PNG folders, as the shared annotation tables (:mod:`cv_models.data.annotations`) with a
``segmentation`` (COCO, YOLO) or ``png`` (folders) column; then :func:`add_mask_facts` decodes every mask once.
The settings are the instance segmentation task's ``data.options`` (cv_models/instance_segmentation/)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cv_models.base import DataError
from cv_models.data.annotations import AnnotationTables, build_tables, select_and_split
from cv_models.data.coco import read_coco
from cv_models.data.instance_folder import list_instance_folders
from cv_models.data.instance_masks import mask_facts
from cv_models.data.registry import register
from cv_models.data.yolo import read_yolo

YOLO_OPTIONS = ("data_yaml", "images", "labels", "splits", "names")  # passed to read_yolo when set


@register("instance_segmentation", "coco")
def read_coco_instances(data) -> AnnotationTables:
    o = data.options
    tables = read_coco(Path(data.path), data.classes, annotations=o.annotations or "annotations/{split}.json",
                       images=o.images or "images", splits=o.splits, with_masks=True)
    return select_and_split(tables, data, o.keep_classes)


@register("instance_segmentation", "yolo")
def read_yolo_instances(data) -> AnnotationTables:
    o = data.options
    # options left None are the reader's defaults (images/{split}, labels/{split}, or the data_yaml's)
    tables = read_yolo(Path(data.path), data.classes, with_masks=True,
                       **{k: getattr(o, k) for k in YOLO_OPTIONS if getattr(o, k) is not None})
    return select_and_split(tables, data, o.keep_classes)


@register("instance_segmentation", "instance_folders")
def read_instance_folders(data) -> AnnotationTables:
    """``<path>/<id>/images/<id>.png`` and one PNG per instance in ``<path>/<id>/masks/``: one class; the boxes
    are placeholders until :func:`add_mask_facts` sets them to each mask's extent."""
    if data.options.keep_classes:
        raise DataError("data.options.keep_classes is read by formats coco and yolo, not instance_folders "
                        "(one class per folder layout: point data.path at the classes you want)")
    root = Path(data.path)
    class_name = (data.classes or [data.options.class_name])[0]
    image_rows, box_rows = [], []
    for rec in list_instance_folders(root, data.split_from, data.split_fractions, data.split_seed):
        rel = str(Path(rec["path"]).relative_to(root))
        image_rows.append({"item": rec["folder"], "split": rec["split"], "image_id": str(rec["image_id"]),
                           "file_name": rel, "declared_width": 0, "declared_height": 0,
                           "n_image_files": rec["n_image_files"]})
        for inst in rec["instances"]:
            box_rows.append({"item": inst["png"], "split": rec["split"], "ann_id": str(inst["ann_id"]),
                             "image_id": str(rec["image_id"]), "file_name": rel, "category": class_name,
                             "x0": 0.0, "y0": 0.0, "x1": 1.0, "y1": 1.0, "iscrowd": 0, "area": 0.0,
                             "png": inst["png"]})
    t = build_tables(image_rows, box_rows, root, [class_name], [class_name], {"all": str(root)})
    t.images["one_image_file"] = [r["n_image_files"] == 1 for r in image_rows]
    return t


def add_mask_facts(images: pd.DataFrame, anns: pd.DataFrame, tol_px: float, tol_frac: float) -> pd.DataFrame:
    """Decode every mask once and add the rule columns of :func:`mask_facts` to the annotations (a PNG instance's
    box becomes its mask's extent)."""
    sizes = images.drop_duplicates("split_image_id").set_index("split_image_id")[["width", "height", "decodes"]]
    anns = anns.copy()
    rows = []
    for idx, a in zip(anns.index, anns.to_dict("records")):
        key = f"{a['split']}/{a['image_id']}"
        if key not in sizes.index or not sizes.loc[key, "decodes"]:
            rows.append({**mask_facts(0, 0, None), "kind": "n/a", "decodes": True})  # the image's own rule reports it
            continue
        w, h = int(sizes.loc[key, "width"]), int(sizes.loc[key, "height"])
        png = a.get("png")
        if isinstance(png, str):  # no stored box: the mask's extent is the box
            facts = mask_facts(h, w, png_path=Path(png))
            if facts["decodes"] and facts["non_empty"]:
                anns.loc[idx, ["x0", "y0", "x1", "y1", "area"]] = [
                    facts["mask_x0"], facts["mask_y0"], facts["mask_x1"], facts["mask_y1"], float(facts["area"])]
        else:
            bbox = [a["x0"], a["y0"], a["x1"] - a["x0"], a["y1"] - a["y0"]]
            facts = mask_facts(h, w, a.get("segmentation"), bbox=bbox, tolerance_px=tol_px, tolerance_fraction=tol_frac)
        rows.append(facts)
    facts = pd.DataFrame(rows, index=anns.index, columns=list(mask_facts(0, 0, None)))
    return pd.concat([anns.drop(columns=[c for c in facts.columns if c in anns]), facts], axis=1)
