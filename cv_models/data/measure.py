"""Figures about a dataset that settings are chosen from: image sizes and aspect ratios, channels, split sizes,
class balance, objects per image and box sizes, duplicates and invalid boxes.

Read from the task's own validation tables (:meth:`cv_models.base.CVTask.validation_tables`), so every format
any reader supports is measured the same way; which figures exist follows the tables' columns.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class DataFacts:
    n_images: int
    splits: dict[str, int]  # images per split
    width: float  # medians
    height: float
    aspect: float  # median width / height
    channels: int  # most common
    classes: list[str]
    class_counts: dict[str, float] = field(default_factory=dict)  # train split: images, objects or pixel fraction
    imbalance: float = 1.0  # most frequent class / least frequent (train split)
    duplicates: int = 0  # byte-identical files beyond the first of each group
    conflicting_duplicates: int = 0  # identical files under two labels
    objects_per_image: float = 0.0  # mean (box tasks)
    most_objects: int = 0
    box_side: float = 0.0  # 10th percentile of the boxes' shorter side, as a fraction of the image's shorter side
    invalid_boxes: int = 0
    n_boxes: int = 0

    def rows(self) -> list[tuple[str, str]]:
        """(figure, value) for the printed table."""
        out = [("images", f"{self.n_images} ({', '.join(f'{k} {v}' for k, v in self.splits.items())})"),
               ("median size (w x h)", f"{self.width:.0f} x {self.height:.0f}, aspect {self.aspect:.2f}"),
               ("channels", str(self.channels)),
               ("classes", f"{len(self.classes)}: {', '.join(self.classes[:8])}{' ...' if len(self.classes) > 8 else ''}"),
               ("class balance (train)", f"most / least frequent = {self.imbalance:.1f}")]
        if self.n_boxes:
            out += [("objects per image", f"mean {self.objects_per_image:.1f}, most {self.most_objects}"),
                    ("small boxes", f"10% of boxes are under {self.box_side:.1%} of the image's shorter side"),
                    ("invalid boxes", f"{self.invalid_boxes} of {self.n_boxes}")]
        out.append(("duplicates", f"{self.duplicates} identical files, {self.conflicting_duplicates} under two labels"))
        return out


def _image_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    for name in ("samples", "images"):
        if name in tables and {"width", "height"} <= set(tables[name].columns):
            return tables[name]
    raise ValueError(f"no table with image sizes among {sorted(tables)}")


def _class_counts(tables: dict[str, pd.DataFrame]) -> dict[str, float]:
    """Train-split frequency per class, from whichever table the task keeps them in."""
    if "class_pixels" in tables:
        t = tables["class_pixels"]
        return t[t["split"] == "train"].set_index("class")["pixels"].astype(float).to_dict()
    if "annotations" in tables and "category" in tables["annotations"]:
        t = tables["annotations"]
        return t[t["split"] == "train"]["category"].value_counts().astype(float).to_dict()
    t = _image_table(tables)
    return t[t["split"] == "train"]["label"].value_counts().astype(float).to_dict() if "label" in t else {}


def _boxes(tables: dict[str, pd.DataFrame], images: pd.DataFrame) -> dict:
    anns = tables.get("annotations")
    if anns is None or not {"x0", "y0", "x1", "y1"} <= set(anns.columns) or anns.empty:
        return {}
    short = np.minimum(anns["x1"] - anns["x0"], anns["y1"] - anns["y0"])
    image_short = float(np.median(np.minimum(images["width"], images["height"])))
    per_image = images["n_boxes"] if "n_boxes" in images else anns.groupby(["split", "image_id"]).size()
    valid = anns["valid"] if "valid" in anns else pd.Series(True, index=anns.index)
    return {"n_boxes": len(anns), "invalid_boxes": int((~valid.astype(bool)).sum()),
            "objects_per_image": float(per_image.mean()), "most_objects": int(per_image.max()),
            "box_side": float(np.percentile(short[valid.astype(bool)], 10)) / max(image_short, 1.0)}


def measure(tables: dict[str, pd.DataFrame], classes: list[str]) -> DataFacts:
    images = _image_table(tables)
    ok = images[(images["width"] > 0) & (images["height"] > 0)]
    counts = _class_counts(tables)
    present = [v for v in counts.values() if v > 0]
    dup = 0
    if "sha256" in images:
        dup = int(images["sha256"].duplicated().sum())
    conflicting = int(images["duplicate_with_other_label"].sum()) if "duplicate_with_other_label" in images else 0
    channels = int(ok["channels"].mode().iloc[0]) if "channels" in ok and len(ok) else 3
    return DataFacts(
        n_images=len(images), splits=images["split"].value_counts().reindex(["train", "val", "test"], fill_value=0).to_dict(),
        width=float(ok["width"].median()) if len(ok) else 0.0, height=float(ok["height"].median()) if len(ok) else 0.0,
        aspect=float((ok["width"] / ok["height"]).median()) if len(ok) else 1.0, channels=channels, classes=list(classes),
        class_counts=counts, imbalance=(max(present) / min(present)) if present else 1.0, duplicates=dup,
        conflicting_duplicates=conflicting, **_boxes(tables, images))
