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
    notes: list[str] = field(default_factory=list)  # reader findings that are reported but not fatal


def safe_relative(name: str) -> bool:
    """A file name that stays inside its folder: relative, no ``..``, no drive or backslash tricks."""
    if not name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return False
    return ".." not in PurePosixPath(name.replace("\\", "/")).parts


def build_tables(image_rows: list[dict], box_rows: list[dict], image_root: Path, known: list[str],
                 categories: list[str], sources: dict[str, str]) -> AnnotationTables:
    """Probe the listed image files and add the rule columns (no row is removed here).

    A row may carry its own ``image_root`` (per-split image folders such as COCO's ``train2017/``).
    '..' and absolute file names are refused here; a symlink inside the dataset tree that points outside it
    follows the one policy of every format, data.follow_symlinks (tasks/validate.py: symlink_policy).
    """
    rows = []
    for r in image_rows:
        r = dict(r)
        folder = Path(r.pop("image_root", image_root))
        inside = safe_relative(r["file_name"])
        path = (folder / r["file_name"]) if inside else Path(str(r["file_name"]))
        exists = inside and path.is_file()
        probe = probe_image(path) if exists else {"width": 0, "height": 0, "decodes": False}
        dw, dh = int(r.get("declared_width") or 0), int(r.get("declared_height") or 0)
        rows.append({**r, "path": str(path), "declared_width": dw, "declared_height": dh,
                     "width": probe["width"] or dw, "height": probe["height"] or dh, "path_inside": inside, "exists": exists,
                     "decodes": bool(probe["decodes"]),
                     "size_matches": not probe["decodes"] or not dw or (dw, dh) == (probe["width"], probe["height"]),
                     "split_image_id": f"{r['split']}/{r['image_id']}",
                     "item_path": f"{r['item']} (tried {path})"})  # failures name the path that was tried
    images = pd.DataFrame(rows, columns=[c for c in IMAGE_COLUMNS if c != "n_boxes"] + ["item_path"]
                          + [c for c in (rows[0] if rows else {}) if c not in IMAGE_COLUMNS and c != "item_path"])
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
    unknown = set(splits) - {"train", "val", "test"}
    if unknown or not splits:
        raise DataError(f"{reader}: data.options.splits maps train, val and test to names on disk, got {splits}")


def require_all_splits(t: AnnotationTables, reader: str) -> None:
    """split_from=folders: the data must bring train, val and test."""
    missing = [s for s in ("train", "val", "test") if s not in t.sources]
    if missing:
        raise DataError(f"{reader}: no {missing} split on disk (rule: data.split_from=folders needs train, val and "
                        f"test; map the names with data.options.splits, or set data.split_from: seed to draw the "
                        f"splits from what there is)")


def select_and_split(t: AnnotationTables, data, keep_classes: list[str] | None) -> AnnotationTables:
    """What every annotation reader does last: ``keep_classes`` (:func:`keep_only`), then the splits, drawn by
    ``data.split_seed`` (split_from=seed) or train, val and test required on disk (split_from=folders)."""
    if keep_classes:
        t = keep_only(t, keep_classes)
    if data.split_from == "seed":
        return seed_split(t, data.split_fractions, data.split_seed)
    require_all_splits(t, data.format)
    return t


def keep_only(t: AnnotationTables, keep: list[str]) -> AnnotationTables:
    """``data.options.keep_classes``: train on some of the dataset's classes (COCO's person, say). Boxes of the
    other classes are left out, not flagged invalid; their images stay, as background where nothing is left.
    The class ids follow ``keep``'s order. A name the data does not have stops the run, naming it."""
    from cv_models.settings import did_you_mean

    unknown = [name for name in keep if name not in t.categories]
    if unknown:
        hints = [f"{name!r}" + (f" ({hint.removeprefix('; ')})" if (hint := did_you_mean(name, t.categories)) else "")
                 for name in unknown]
        raise DataError(f"data.options.keep_classes: {', '.join(hints)} not among the dataset's classes "
                        f"({len(t.categories)}: {', '.join(t.categories[:20])}{' ...' if len(t.categories) > 20 else ''})")
    if len(set(keep)) != len(keep):
        raise DataError(f"data.options.keep_classes lists a class twice: {keep}")
    boxes = t.annotations
    kept = boxes["category"].isin(keep)
    images = t.images.copy()
    key = boxes.loc[kept, "split"].astype(str) + "/" + boxes.loc[kept, "image_id"].astype(str)
    images["n_boxes"] = images["split_image_id"].map(key.groupby(key).size()).fillna(0).astype(int)
    note = (f"data.options.keep_classes {keep}: {int((~kept).sum())} of {len(boxes)} boxes of the other "
            f"{len(t.categories) - len(keep)} classes left out; {int((images['n_boxes'] == 0).sum())} of "
            f"{len(images)} images have none of the kept classes (trained as background)")
    return AnnotationTables(images, boxes[kept].reset_index(drop=True), list(keep), t.sources, [*t.notes, note])


def seed_split(t: AnnotationTables, fractions: dict[str, float], seed: int) -> AnnotationTables:
    """split_from=seed: pool every image read (whatever split it came from) and draw train/val/test by seed.

    Image ids are prefixed with their source split when several were pooled, so that two files whose
    COCO ids collide stay two images.
    """
    import numpy as np

    images, boxes = t.images.copy(), t.annotations.copy()
    pooled = images["split"].nunique() > 1
    old_key = images["split_image_id"]
    box_key = boxes["split"].astype(str) + "/" + boxes["image_id"].astype(str)
    keys = sorted(old_key.unique())
    order = np.random.default_rng(seed).permutation(len(keys))
    n_train, n_val = round(len(keys) * fractions["train"]), round(len(keys) * fractions["val"])
    assign = {keys[i]: "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
              for rank, i in enumerate(order)}
    if pooled:
        images["image_id"] = images["split"].astype(str) + ":" + images["image_id"].astype(str)
        if len(boxes):
            boxes["image_id"] = boxes["split"].astype(str) + ":" + boxes["image_id"].astype(str)
    images["split"] = old_key.map(assign)
    images["split_image_id"] = images["split"] + "/" + images["image_id"].astype(str)
    if len(boxes):
        boxes["split"] = box_key.map(assign).fillna(boxes["split"])  # a box of an unlisted image keeps its split
    sources = {s: "seeded split of " + ", ".join(sorted(set(t.sources.values()))) for s in ("train", "val", "test")}
    return AnnotationTables(images, boxes, t.categories, sources, t.notes)
