"""What the validate stage checks and reports of a detection dataset: its tables, the great-expectations rules on
them, the notes (images without boxes, boxes dropped) and the per-split summaries."""

from __future__ import annotations

import pandas as pd

from cv_models.base import Check
from cv_models.checks import all_true, unique
from cv_models.data.annotations import BOX_RULES, AnnotationTables, invalid_box_findings

MAX_NOTES = 200


def tables(t: AnnotationTables) -> dict[str, pd.DataFrame]:
    """The tables the checks run on: one row per image, one per box (polygons left out)."""
    return {"images": t.images, "annotations": t.annotations.drop(columns=["segmentation"], errors="ignore")}


def checks(classes: list[str], policy: str) -> list[Check]:
    """The image rules, then one rule per box fact; with ``invalid_boxes: drop`` the box rules report every invalid
    box but pass (the boxes are left out of training)."""
    mostly = 1.0 if policy == "fail" else 0.0
    out = [
        all_true(
            "images", "file name stays inside the dataset folder (no '..', no absolute path)", "path_inside", key="item"
        ),
        all_true("images", "image file exists", "exists", when="path_inside == True", key="item_path"),
        all_true("images", "image file decodes", "decodes", when="exists == True", key="item"),
        all_true("images", "image size matches the annotation's width and height", "size_matches", key="item"),
        unique("images", "image id unique within its split", "split_image_id", key="item"),
    ]
    rules = dict(BOX_RULES, known_category=f"category is one of the known classes {classes}")
    out += [all_true("annotations", rule, col, key="item", mostly=mostly) for col, rule in rules.items()]
    return out


def notes(tables: dict[str, pd.DataFrame], reader_notes: list[str], policy: str) -> list[str]:
    """The reader's notes, images without boxes (not fatal) and, with ``invalid_boxes: drop``, each box dropped."""
    images, boxes = tables["images"], tables["annotations"]
    empty = images[images["n_boxes"] == 0]
    out = list(reader_notes)
    if len(empty):
        out.append(
            f"{len(empty)} image(s) without boxes (reported, not fatal; they train as background): "
            + ", ".join(empty["item"].head(20))
            + (" ..." if len(empty) > 20 else "")
        )
    if policy == "drop" and len(boxes):
        findings = invalid_box_findings(boxes)
        out += [f"dropped (data.options.invalid_boxes=drop): {f}" for f in findings[:MAX_NOTES]]
        if len(findings) > MAX_NOTES:
            out.append(f"... and {len(findings) - MAX_NOTES} more dropped boxes (see annotations.csv)")
    return out


def summaries(tables: dict[str, pd.DataFrame]) -> dict[str, str]:
    """Markdown tables: images (and images without boxes) per split, boxes per class and split."""
    images, boxes = tables["images"], tables["annotations"]
    per_split = images.groupby("split").agg(
        images=("item", "size"), without_boxes=("n_boxes", lambda s: int((s == 0).sum()))
    )
    lines = ["| split | images | images without boxes |", "|---|---|---|"]
    lines += [f"| {s} | {r.images} | {r.without_boxes} |" for s, r in per_split.iterrows()]
    out = {"Images per split": "\n".join(lines)}
    if len(boxes):
        counts = boxes.groupby(["category", "split"]).size().unstack(fill_value=0)
        lines = ["| class | " + " | ".join(counts.columns) + " |", "|---|" + "---|" * len(counts.columns)]
        lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in counts.iterrows()]
        out["Boxes per class and split"] = "\n".join(lines)
    return out
