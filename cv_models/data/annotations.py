"""The in-memory annotation table every box reader (COCO JSON, Pascal VOC XML) produces.

Two pandas tables, the same whatever the source format, so that validation (great-expectations)
and the datasets of detection and instance segmentation read one thing:

``images``: one row per listed image — ``item`` (where it is declared, for reports), ``split``,
``image_id`` (str), ``file_name`` (as written in the annotations), ``path``, ``declared_width``/
``declared_height`` (0 when absent), ``width``/``height`` (read from the file), ``path_inside``,
``exists``, ``decodes``, ``size_matches``, ``split_image_id`` and ``n_boxes``.

``annotations``: one row per box — ``item``, ``split``, ``ann_id``, ``image_id``, ``file_name``,
``category`` (name), ``x0, y0, x1, y1`` (pixels, corner format), ``iscrowd``, ``area``, the rule
columns ``image_present``, ``known_category``, ``positive_size``, ``inside_image`` and their
conjunction ``valid``; ``segmentation`` (raw COCO polygon/RLE) only when a reader is asked for masks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import pandas as pd

from cv_models.base import DataError
from cv_models.data.probe import probe_image

IMAGE_COLUMNS = ["item", "split", "image_id", "file_name", "path", "declared_width", "declared_height", "width", "height",
                 "path_inside", "exists", "decodes", "size_matches", "split_image_id", "n_boxes"]
BOX_COLUMNS = ["item", "split", "ann_id", "image_id", "file_name", "category", "x0", "y0", "x1", "y1", "iscrowd", "area",
               "image_present", "known_category", "positive_size", "inside_image", "valid"]
BOX_RULES = {  # column -> the rule in plain words (the validation report and the drop notes use these)
    "image_present": "every annotation's image is listed",
    "known_category": "category is one of the known classes",
    "positive_size": "box has positive width and height",
    "inside_image": "box lies inside the image",
}


@dataclass
class AnnotationTables:
    images: pd.DataFrame
    annotations: pd.DataFrame
    categories: list[str]  # class names in the source's order (COCO category ids, VOC first appearance sorted)
    sources: dict[str, str] = field(default_factory=dict)  # split -> annotation file or split list read


def safe_relative(name: str) -> bool:
    """A file name that stays inside its folder: relative, no ``..``, no drive or backslash tricks."""
    if not name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return False
    return ".." not in PurePosixPath(name.replace("\\", "/")).parts


def build_tables(image_rows: list[dict], box_rows: list[dict], image_root: Path, known: list[str],
                 categories: list[str], sources: dict[str, str]) -> AnnotationTables:
    """Probe the listed image files and add the rule columns (no row is removed here)."""
    rows = []
    for r in image_rows:
        # '..' and absolute names are refused here; a symlink inside the folder that points outside it follows
        # the one policy of every format, data.follow_symlinks (tasks/validate.py: symlink_policy)
        inside = safe_relative(r["file_name"])
        path = (image_root / r["file_name"]) if inside else Path(str(r["file_name"]))
        exists = inside and path.is_file()
        probe = probe_image(path) if exists else {"width": 0, "height": 0, "decodes": False}
        dw, dh = int(r.get("declared_width") or 0), int(r.get("declared_height") or 0)
        rows.append({**r, "path": str(path), "declared_width": dw, "declared_height": dh,
                     "width": probe["width"] or dw, "height": probe["height"] or dh, "path_inside": inside, "exists": exists,
                     "decodes": bool(probe["decodes"]),
                     "size_matches": not probe["decodes"] or not dw or (dw, dh) == (probe["width"], probe["height"]),
                     "split_image_id": f"{r['split']}/{r['image_id']}"})
    images = pd.DataFrame(rows, columns=[c for c in IMAGE_COLUMNS if c != "n_boxes"])
    boxes = pd.DataFrame(box_rows)
    if boxes.empty:
        boxes = pd.DataFrame(columns=[c for c in BOX_COLUMNS if c not in BOX_RULES and c != "valid"])
    sizes = images.drop_duplicates("split_image_id").set_index("split_image_id")[["width", "height"]]
    key = boxes["split"].astype(str) + "/" + boxes["image_id"].astype(str)
    w, h = key.map(sizes["width"]), key.map(sizes["height"])
    boxes["image_present"] = key.isin(sizes.index)
    boxes["known_category"] = boxes["category"].isin(known)
    boxes["positive_size"] = (boxes["x1"] > boxes["x0"]) & (boxes["y1"] > boxes["y0"])
    # an image that is missing or unreadable is reported by its own rule, not once per box
    boxes["inside_image"] = ~boxes["image_present"] | (w.fillna(0) <= 0) | (
        (boxes["x0"] >= 0) & (boxes["y0"] >= 0) & (boxes["x1"] <= w) & (boxes["y1"] <= h))
    boxes["valid"] = boxes[list(BOX_RULES)].all(axis=1)
    counts = key.groupby(key).size() if len(boxes) else pd.Series(dtype=int)
    images["n_boxes"] = images["split_image_id"].map(counts).fillna(0).astype(int)
    boxes["iscrowd"] = boxes["iscrowd"].astype(int) if len(boxes) else boxes["iscrowd"]
    return AnnotationTables(images, boxes.reset_index(drop=True), categories, sources)


def invalid_box_findings(boxes: pd.DataFrame) -> list[str]:
    """``<item>: <rule>`` for every rule every box breaks."""
    out = []
    for col, rule in BOX_RULES.items():
        if col in boxes:
            out += [f"{item}: {rule}" for item in boxes.loc[~boxes[col].astype(bool), "item"]]
    return out


def check_split_names(splits: dict[str, str], reader: str) -> None:
    missing = {"train", "val", "test"} - set(splits)
    if missing:
        raise DataError(f"{reader}: data.options.splits must name train, val and test, missing {sorted(missing)}")
