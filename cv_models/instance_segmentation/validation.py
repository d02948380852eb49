"""What the validate stage checks and reports for instance segmentation: the tables it validates, the rules
(great-expectations, one line each), the notes (left-out crowds, images without instances) and the summaries."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from cv_models.base import Check
from cv_models.checks import all_true

IMAGES, ANNS = "images", "annotations"  # the tables checked
ITEM = "item"  # the column that names a failing row


def validation_tables(images: pd.DataFrame, anns: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The images and annotations tables, without the masks themselves."""
    return {"images": images, "annotations": anns.drop(columns=["segmentation"], errors="ignore")}


def checks(tables: dict[str, pd.DataFrame], classes: list[str]) -> list[Check]:
    out = [
        all_true(IMAGES, "file name stays inside the dataset folder", "path_inside", key=ITEM),
        all_true(IMAGES, "image file exists", "exists", key="item_path"),
        all_true(IMAGES, "every image decodes", "decodes", key=ITEM),
        all_true(IMAGES, "image size matches the declared width and height", "size_matches", key=ITEM),
        all_true(ANNS, "every annotation's image is listed", "image_present", key=ITEM),
        all_true(ANNS, f"category is one of the known classes {classes}", "known_category", key=ITEM),
        all_true(ANNS, "every mask decodes", "decodes", key=ITEM),
        all_true(ANNS, "polygons have at least 3 points (an even number of coordinates)", "polygon_ok", key=ITEM),
        all_true(ANNS, "RLE counts add up to the image size (height*width)", "rle_sum_ok", key=ITEM),
        all_true(ANNS, "instance PNG is binary (two values, background 0)", "png_binary", key=ITEM),
        all_true(ANNS, "mask has the image's size", "size_matches", key=ITEM),
        all_true(ANNS, "mask has a non-empty area", "non_empty", key=ITEM),
        all_true(ANNS, "box matches the mask's extent (within the tolerance)", "box_matches", key=ITEM),
    ]
    if "one_image_file" in tables["images"]:
        out.append(all_true(IMAGES, "an image folder holds exactly one file in images/", "one_image_file", key=ITEM))
    return out


def notes(tables: dict[str, pd.DataFrame], reader_notes: list[str]) -> list[str]:
    """The reader's notes, each iscrowd annotation left out, and the images without instances."""
    images, anns = tables["images"], tables["annotations"]
    out = list(reader_notes)
    out += (
        [
            f"{item}: iscrowd annotation left out of training and evaluation"
            for item in anns.loc[anns["iscrowd"].astype(int) == 1, "item"]
        ]
        if len(anns)
        else []
    )
    empty = images[images["n_boxes"] == 0]
    if len(empty):
        out.append(f"{len(empty)} image(s) without instances (kept as negatives), e.g. {empty['item'].iloc[0]}")
    return out


def summaries(tables: dict[str, pd.DataFrame], sized: Callable[[], str]) -> dict[str, str]:
    """Instances and mean mask area per split and class, the mask storage kinds, and ``sized()``: the model
    settings sized from the data (none of it without annotations)."""
    anns = tables["annotations"]
    if anns.empty:
        return {}
    table = (
        anns.groupby(["split", "category"]).agg(instances=("item", "size"), mean_area=("area", "mean")).reset_index()
    )
    kinds = anns.groupby("kind").size().to_dict()
    lines = ["| split | class | instances | mean mask area (px) |", "|---|---|---|---|"]
    lines += [f"| {r.split} | {r.category} | {r.instances} | {r.mean_area:.0f} |" for r in table.itertuples()]
    return {
        "Instances per class": "\n".join(lines) + f"\n\nMask storage: {kinds}",
        "Settings sized from the data": sized(),
    }
