"""What the validate stage checks of a segmentation dataset: one row per image with its mask's facts (the
``samples`` table) and the pixels per class and split (``class_pixels``), the great-expectations rules on them, the
notes that do not fail the data, and the per-class pixel frequency table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cv_models.base import Check, DataError
from cv_models.checks import all_true, in_set, within
from cv_models.data.class_masks import INDEX_MODES, SPLITS, CocoMaskListing, MaskFolderListing, MaskReader, mask_facts
from cv_models.data.probe import IMAGE_SUFFIXES, probe_image
from cv_models.segmentation.settings import SegmentationDataOptions
from cv_models.settings import DataConfig

Listing = MaskFolderListing | CocoMaskListing

SAMPLES, MASK = "samples", "mask"  # the table the rules check; the column naming a failing mask
# sizes from the header (width > 0), so a decompression bomb refused before decoding breaks the size rule too
SIZED = "width > 0"
DECODED = "decodes == True"
HAS_MASK = "mask_exists == True"
MASK_READ = "mask_decodes == True"
BOTH_READ = "mask_decodes == True and decodes == True"
KNOWN_COLOURS = "mask_decodes == True and colors_declared == True"


def _image_facts(path: str) -> dict:
    """The image file's facts (cv_models/data/probe.py), or those of a missing file."""
    if Path(path).is_file():
        return probe_image(Path(path))
    return {
        "bytes": 0,
        "sha256": f"missing:{path}",
        "width": 0,
        "height": 0,
        "channels": 0,
        "mode": "",
        "decodes": False,
        "error": "file missing",
    }


def _records(listing: Listing, names: list[str], ignore_index: int, reader: MaskReader) -> tuple[list, list]:
    """One record per image (its facts and its mask's), and one row per image and class with its pixel count."""
    records, pixel_rows = [], []
    for r in listing.rows:
        image = _image_facts(r["path"])
        facts = mask_facts(listing, r, names, ignore_index, reader)
        counts = facts.pop("counts")
        if counts is not None:
            pixel_rows += [
                {"split": r["split"], "class": names[k], "pixels": int(c), "image": int(c > 0)}
                for k, c in enumerate(counts)
            ]
        records.append({"path": r["path"], "split": r["split"], "mask": r["mask_source"], **image, **facts})
    return records, pixel_rows


def _samples_table(records: list[dict], rows: list[dict], root: str) -> pd.DataFrame:
    """The ``samples`` table: the records with the columns the rules check."""
    table = pd.DataFrame(records)
    if table.empty:
        raise DataError(f"{root}: no images found (rule: a dataset needs images)")
    table["suffix_is_image"] = table["path"].map(lambda p: Path(p).suffix.lower() in IMAGE_SUFFIXES)
    table["size_matches"] = (table["width"] == table["mask_width"]) & (table["height"] == table["mask_height"])
    if "declared_width" in rows[0]:  # COCO: the JSON's size must be the file's size
        table["size_matches"] &= (table["width"] == [r["declared_width"] for r in rows]) & (
            table["height"] == [r["declared_height"] for r in rows]
        )
    table["mask_single_channel"] = table["mask_mode"].isin(INDEX_MODES)
    table["colors_declared"] = table["undeclared_colors"] == ""
    table["has_foreground"] = table["foreground_pixels"] > 0
    splits_per_hash = table.groupby("sha256")["split"].nunique()
    table["duplicate_in_other_split"] = table["sha256"].map(splits_per_hash).fillna(0).gt(1)
    return table


def _class_pixels(pixel_rows: list[dict]) -> pd.DataFrame:
    """The ``class_pixels`` table: pixels, images and the pixel fraction of each class in each split."""
    pixels = pd.DataFrame(pixel_rows, columns=["split", "class", "pixels", "image"])
    freq = (
        pixels.groupby(["class", "split"], sort=False)
        .agg(pixels=("pixels", "sum"), images=("image", "sum"))
        .reset_index()
    )
    totals = freq.groupby("split")["pixels"].transform("sum")
    freq["fraction"] = (freq["pixels"] / totals.where(totals > 0, 1)).round(6)
    freq["class_split"] = [f"class '{c}' in split '{s}'" for c, s in zip(freq["class"], freq["split"])]
    return freq


def sample_tables(
    listing: Listing, names: list[str], ignore_index: int, reader: MaskReader, root: str
) -> dict[str, pd.DataFrame]:
    """The validate stage's tables: ``samples`` and ``class_pixels``."""
    records, pixel_rows = _records(listing, names, ignore_index, reader)
    return {"samples": _samples_table(records, listing.rows, root), "class_pixels": _class_pixels(pixel_rows)}


def _mask_colour_check(o: SegmentationDataOptions) -> Check:
    """Palette and RGB masks: rejected, or their colours declared (or, with none declared, not class masks)."""
    if o.mask_color_mode == "reject":
        rule = (
            "mask is single-channel class indices (palette and RGB masks are rejected: "
            "data.options.mask_color_mode=reject)"
        )
        return all_true(SAMPLES, rule, "mask_single_channel", when=MASK_READ, key=MASK)
    if not o.colors:  # nothing declared: these files are not class-index masks at all
        rule = (
            "mask is a single-channel class-index image (RGB or palette masks need "
            "data.options.colors, or data.options.palette_as_index for VOC-style palette "
            "PNGs; RGB files here usually mean data.options.masks_dir points at photos)"
        )
        return all_true(SAMPLES, rule, "colors_declared", when=MASK_READ, key=MASK)
    rule = "palette / RGB mask colours are declared in data.options.colors (or data.options.ignore_color)"
    return all_true(SAMPLES, rule, "colors_declared", when=MASK_READ, key=MASK)


def checks(d: DataConfig, o: SegmentationDataOptions, names: list[str], ignore_index: int) -> list[Check]:
    """The rules of the ``samples`` table, one line each."""
    low, high = d.min_size, d.max_size
    values = f"mask values in the declared classes 0..{len(names) - 1} {names} or the ignore index {ignore_index}"
    mask_decodes = "every mask decodes (image file or COCO annotation)"
    out = [
        all_true(SAMPLES, "every file decodes as an image", "decodes"),
        within(SAMPLES, f"image width within [{low}, {high}]", "width", low, high, when=SIZED),
        within(SAMPLES, f"image height within [{low}, {high}]", "height", low, high, when=SIZED),
        all_true(SAMPLES, "every image has a mask file (same name under the masks folder)", "mask_exists", key=MASK),
        all_true(SAMPLES, mask_decodes, "mask_decodes", when=HAS_MASK, key=MASK),
        all_true(SAMPLES, "mask has the same height and width as its image", "size_matches", when=BOTH_READ, key=MASK),
        all_true(SAMPLES, values, "values_ok", when=KNOWN_COLOURS, key=MASK),
        in_set(SAMPLES, "no identical image in two splits", "duplicate_in_other_split", [False]),
        _mask_colour_check(o),
    ]
    if d.color_mode == "reject":
        rgb = "image is RGB (grayscale, palette and RGBA are rejected: data.color_mode=reject)"
        out.append(in_set(SAMPLES, rgb, "mode", ["RGB"], when=DECODED))
    return out


def notes(tables: dict[str, pd.DataFrame], color_mode: str, orphan_masks: list[str]) -> list[str]:
    """What the report lists without failing the data: empty masks, converted masks and images, orphan masks,
    classes without pixels in a split."""
    s, out = tables["samples"], []
    read = s[s["mask_decodes"]]
    empty = read.loc[~read["has_foreground"]]
    out += [
        f"{p}: no foreground pixels (mask {m} is all background or ignored)"
        for p, m in zip(empty["path"], empty["mask"])
    ]
    conv = read[read["mask_converted"]]
    out += [
        f"{m}: {mode} mask converted to class indices through data.options.colors"
        for m, mode in zip(conv["mask"], conv["mask_mode"])
    ]
    if color_mode == "convert":
        odd = s[s["decodes"] & (s["mode"] != "RGB")]
        out += [f"{p}: mode {m} converted to RGB (data.color_mode=convert)" for p, m in zip(odd["path"], odd["mode"])]
    out += [f"{m}: mask without an image (not used)" for m in orphan_masks]
    f = tables["class_pixels"]
    out += [f"{r.class_split}: no pixels (its IoU there is undefined)" for r in f[f["pixels"] == 0].itertuples()]
    return out


def summaries(tables: dict[str, pd.DataFrame], names: list[str]) -> dict[str, str]:
    """The per-class pixel frequency as a markdown table: the pixel % and the images with the class, per split."""
    f = tables["class_pixels"]
    if f.empty:
        return {}
    wide = f.pivot_table(index="class", columns="split", values=["fraction", "images"], sort=False)
    present = [s for s in SPLITS if s in f["split"].unique()]
    lines = [
        "| class | " + " | ".join(f"{s} pixels % | {s} images" for s in present) + " |",
        "|---|" + "---|---|" * len(present),
    ]
    for name in names:
        if name not in wide.index:
            continue
        cells = [f"{100 * wide.loc[name, ('fraction', s)]:.2f} | {int(wide.loc[name, ('images', s)])}" for s in present]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return {"Per-class pixel frequency": "\n".join(lines)}
