"""Classification's data validation: the tables the validate stage checks (one row per file, one per class and
split), the great-expectations rules on them and the notes that are reported but not fatal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from cv_models.base import Check
from cv_models.checks import all_true, in_set, within
from cv_models.data.probe import IMAGE_SUFFIXES, probe_image

SAMPLE_COLUMNS = [
    "path",
    "split",
    "label",
    "bytes",
    "sha256",
    "width",
    "height",
    "channels",
    "mode",
    "decodes",
    "error",
]
SPLITS = ("train", "val", "test")
DUPLICATE_LABEL_RULE = (
    "no identical image filed under two different classes (set "
    "data.options.conflicting_duplicates: drop to leave such files out)"
)
COVERAGE_RULE = "every class present in train and val (an empty class folder breaks this)"
RGB_RULE = "image is RGB (grayscale, palette and RGBA are rejected: data.color_mode=reject)"


def tables(rows: list[dict], folders: list[str], classes: list[str]) -> dict[str, pd.DataFrame]:
    """``samples``: every listed file with what its header says; ``coverage``: decodable images per class and split."""
    samples = sample_table(rows)
    return {"samples": samples, "coverage": coverage_table(samples, sorted(set(classes) | set(folders)))}


def sample_table(rows: list[dict]) -> pd.DataFrame:
    table = (
        pd.DataFrame([{**r, **probe_image(Path(r["path"]))} for r in rows])
        if rows
        else pd.DataFrame(columns=SAMPLE_COLUMNS)
    )
    table["suffix_is_image"] = table["path"].map(lambda p: Path(p).suffix.lower() in IMAGE_SUFFIXES)
    splits_per_hash = table.groupby("sha256")["split"].nunique() if len(table) else pd.Series(dtype=int)
    table["duplicate_in_other_split"] = table["sha256"].map(splits_per_hash).fillna(0).gt(1)
    labels_per_hash = table.groupby("sha256")["label"].nunique() if len(table) else pd.Series(dtype=int)
    table["duplicate_with_other_label"] = table["sha256"].map(labels_per_hash).fillna(0).gt(1)
    return table


def coverage_table(samples: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    decoded = samples[samples["decodes"]] if len(samples) else samples

    def count(c: str, s: str) -> int:
        return int(((decoded["label"] == c) & (decoded["split"] == s)).sum()) if len(decoded) else 0

    return pd.DataFrame(
        [
            {"class_split": f"class '{c}' in split '{s}'", "label": c, "split": s, "count": count(c, s)}
            for c in classes
            for s in SPLITS
        ]
    )


def checks(data: Any, tables: dict[str, pd.DataFrame]) -> list[Check]:
    """The rules on the tables; the size rules read the header's size, so a decompression bomb (refused before
    decoding) is named by them too."""
    classes = data.classes or sorted(tables["samples"]["label"].unique())
    low, high = data.min_size, data.max_size
    out = [
        all_true("samples", "every file decodes as an image", "decodes"),
        within("samples", f"image width within [{low}, {high}]", "width", low, high, when="width > 0"),
        within("samples", f"image height within [{low}, {high}]", "height", low, high, when="width > 0"),
        in_set("samples", f"label in the declared classes {list(classes)}", "label", classes),
        in_set("samples", "no identical file in two splits", "duplicate_in_other_split", [False]),
        in_set("samples", DUPLICATE_LABEL_RULE, "duplicate_with_other_label", [False]),
        within("coverage", COVERAGE_RULE, "count", 1, None, when='split != "test"', key="class_split"),
    ]
    if data.color_mode == "reject":
        out.append(in_set("samples", RGB_RULE, "mode", ["RGB"], when="decodes == True"))
    return out


def notes(tables: dict[str, pd.DataFrame], color_mode: str, dropped: list[str]) -> list[str]:
    """Converted colour modes, groups of duplicates left out, and classes with no test image."""
    s, out = tables["samples"], []
    if len(s):
        odd = s[s["decodes"] & (s["mode"] != "RGB")]
        if len(odd) and color_mode == "convert":
            out += [
                f"{p}: mode {m} converted to RGB (data.color_mode=convert)" for p, m in zip(odd["path"], odd["mode"])
            ]
    out += [
        f"identical files under different classes, left out (data.options.conflicting_duplicates=drop): {g}"
        for g in dropped
    ]
    cov = tables["coverage"]
    out += [
        f"{r.class_split}: no images (test metrics for this class will be missing)"
        for r in cov[(cov["split"] == "test") & (cov["count"] == 0)].itertuples()
    ]
    return out
