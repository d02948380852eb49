"""Semantic segmentation readers: class-index masks from a mask folder (``data.format: mask_folder``) or
rasterised from COCO JSON (``data.format: coco``).

Each reader returns a listing: the rows ``{path, split, mask_source, ...}`` the task trains on and validates,
and how one row's mask is read. Class ``k`` of ``data.classes`` is mask value ``k``; ``classes[0]`` is the
background. The settings are the segmentation task's ``data.options`` (cv_models/segmentation/).
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from cv_models.base import DataError
from cv_models.data.probe import IMAGE_SUFFIXES
from cv_models.data.registry import register

SPLITS = ("train", "val", "test")
INDEX_MODES = {"L", "I", "I;16", "I;16B", "I;16L", "1"}  # PIL modes whose values are class indices


def _key(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


@dataclass
class MaskReader:
    """Turns a mask file into a class-index array: index masks as they are, palette / RGB through colours."""

    colors: list | None
    ignore_color: list | None
    ignore_index: int
    color_mode: str
    ignore_values: tuple = ()
    palette_as_index: bool = False
    value_map: dict | None = None

    def read(self, path: Path) -> tuple[np.ndarray, dict]:
        """``(HxW int array, facts)``; facts: mode, channels, converted, undeclared colours."""
        with Image.open(path) as im:
            im.load()
            mode, channels = im.mode, len(im.getbands())
            if mode in INDEX_MODES or (mode == "P" and self.palette_as_index):
                values = np.asarray(im).astype(np.int64)
                if self.value_map:
                    raw = values.copy()
                    for src, dst in self.value_map.items():
                        values[raw == int(src)] = int(dst)
                if self.ignore_values:
                    values[np.isin(values, list(self.ignore_values))] = self.ignore_index
                return values, {"mode": "L" if mode == "P" else mode, "channels": channels, "converted": False,
                                "undeclared_colors": []}
            rgb = np.asarray(im.convert("RGB"))
        facts = {"mode": mode, "channels": channels, "converted": self.color_mode == "convert", "undeclared_colors": []}
        lookup = {}
        for k, c in enumerate(self.colors or []):
            lookup[(int(c[0]) << 16) | (int(c[1]) << 8) | int(c[2])] = k
        if self.ignore_color is not None:
            c = self.ignore_color
            lookup[(int(c[0]) << 16) | (int(c[1]) << 8) | int(c[2])] = self.ignore_index
        keys, inverse = np.unique(_key(rgb), return_inverse=True)
        undeclared = [k for k in keys.tolist() if k not in lookup]
        facts["undeclared_colors"] = [(k >> 16, (k >> 8) & 255, k & 255) for k in undeclared]
        values = np.array([lookup.get(k, -1) for k in keys.tolist()], dtype=np.int64)  # -1: undeclared colour
        return values[inverse].reshape(rgb.shape[:2]), facts


def assign_splits(rows: list[dict], data) -> list[dict]:
    """split_from=seed: one shuffled listing cut by data.split_fractions."""
    order = np.random.default_rng(data.split_seed).permutation(len(rows))
    n_train = int(round(len(rows) * data.split_fractions["train"]))
    n_val = int(round(len(rows) * data.split_fractions["val"]))
    for rank, idx in enumerate(order):
        rows[idx]["split"] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return rows


# ---------------------------------------------------------------- mask folders


@dataclass
class MaskFolderListing:
    """``data.format: mask_folder``: each row's ``mask_path`` is a PNG read by the task's :class:`MaskReader`."""

    rows: list[dict]
    orphan_masks: list[str] = field(default_factory=list)  # masks without an image (reported, not used)

    def class_names(self) -> list[str]:
        raise DataError("data.classes is required for format mask_folder: the class names in mask-value order, "
                        "background first (rule: mask value k = data.classes[k])")

    def mask_exists(self, row: dict) -> bool:
        return Path(row["mask_path"]).is_file()

    def read(self, row: dict, names: Callable[[], list[str]], ignore_index: int, masks: Callable[[], MaskReader],
             unknown: list | None = None) -> tuple[np.ndarray, dict]:
        """``(class-index array, facts)`` of one row; ``names`` and ``masks`` give the class names and the
        :class:`MaskReader` when a format needs them (a mask folder: the reader)."""
        return masks().read(Path(row["mask_path"]))


def split_folders(root: Path, data) -> list[tuple[str | None, Path, Path]]:
    """(split, images folder, masks folder) per split, from the templates and data.split_from."""
    o = data.options
    names = o.splits or {s: s for s in SPLITS}
    if set(names) - set(SPLITS):
        raise DataError(f"data.options.splits maps train, val and test to names on disk, got {names}")
    templated = any("{split}" in getattr(o, k) for k in ("images_dir", "masks_dir"))
    if templated:
        folders = [(s, root / o.images_dir.format(split=n), root / o.masks_dir.format(split=n)) for s, n in names.items()]
    elif o.split_list:  # VOC: one flat image folder and one mask folder, split lists name the stems
        folders = [(s, root / o.images_dir, root / o.masks_dir) for s in names]
    elif data.split_from == "folders":
        folders = [(s, root / o.images_dir / n, root / o.masks_dir / n) for s, n in names.items()]
    else:
        folders = [(None, root / o.images_dir, root / o.masks_dir)]
    for _, images, masks in folders:
        for folder, key in ((images, "images_dir"), (masks, "masks_dir")):
            if not folder.is_dir():
                raise DataError(f"{folder} is missing (rule: format mask_folder reads data.path/{getattr(o, key)}, set by "
                                f"data.options.{key}; a '{{split}}' in it is the split's name, data.options.splits)")
    if data.split_from == "folders" and {s for s, _, _ in folders} != set(SPLITS):
        raise DataError(f"split_from=folders needs train, val and test; data.options.splits names "
                        f"{sorted(s for s, _, _ in folders if s)} (or set data.split_from: seed)")
    return folders


def _listed_images(root: Path, split: str | None, image_dir: Path, o) -> list[Path]:
    """The images of one split: those a split list names (data.options.split_list), else every file of the folder."""
    if not o.split_list:
        return sorted(q for q in image_dir.iterdir() if q.is_file())
    names = o.splits or {s: s for s in SPLITS}
    list_file = root / o.split_list.format(split=names.get(split, split))
    if not list_file.is_file():
        raise DataError(f"{list_file}: split list does not exist (rule: data.options.split_list names one "
                        f"file of image stems per split)")
    stems = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    images = []
    for stem in stems:
        options = [image_dir / (stem + sfx) for sfx in [o.image_suffix, *sorted(IMAGE_SUFFIXES)]]
        images.append(next((p for p in options if p.is_file()), options[0]))
    return images


def _orphan_masks(folders: list[tuple[str | None, Path, Path]], rows: list[dict], o) -> list[str]:
    if o.split_list:
        return []
    listed = {Path(r["path"]).stem for r in rows}
    return sorted(str(m) for _, image_dir, mask_dir in folders if mask_dir.is_dir() for m in mask_dir.iterdir()
                  if m.is_file() and m.name.endswith(o.mask_suffix) and m.name[: -len(o.mask_suffix)] not in listed)


@register("segmentation", "mask_folder")
def list_mask_folder(data) -> MaskFolderListing:
    """Every image of the split folders (or split lists) with the same-named mask under the masks folder."""
    o, root = data.options, Path(data.path)
    folders = split_folders(root, data)
    rows = []
    for split, image_dir, mask_dir in folders:
        for p in _listed_images(root, split, image_dir, o):
            mask = mask_dir / (p.stem + o.mask_suffix)
            rows.append({"path": str(p), "split": split, "mask_path": str(mask), "mask_source": str(mask)})
    itself = next((r for r in rows if Path(r["mask_path"]) == Path(r["path"])), None)
    if itself is not None:
        raise DataError(f"{itself['path']}: this image would be its own mask: the images and masks folders are the same "
                        f"folder (rule: data.options.masks_dir names the folder of class masks, e.g. SegNet "
                        f"'{{split}}annot'; images_dir={o.images_dir!r}, masks_dir={o.masks_dir!r})")
    if data.split_from == "seed":
        for r in rows:
            r["split"] = None
    orphans = _orphan_masks(folders, rows, o)
    return MaskFolderListing(assign_splits(rows, data) if data.split_from == "seed" else rows, orphans)


# ---------------------------------------------------------------- COCO JSON


def coco_class_mask(coco: Any, image_id: int, names: list[str], ignore_index: int,
                    unknown: list | None = None) -> np.ndarray:
    """Rasterise one image's annotations in file order: category -> class index, crowd regions ->
    ignore index, a category not in the declared classes -> -1 (its name appended to ``unknown``)."""
    info = coco.imgs[image_id]
    mask = np.zeros((info["height"], info["width"]), dtype=np.int64)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
        name = coco.cats.get(ann["category_id"], {}).get("name", f"category_id {ann['category_id']}")
        if ann.get("iscrowd"):
            value = ignore_index
        elif name in names:
            value = names.index(name)
        else:
            value = -1
            if unknown is not None:
                unknown.append(name)
        mask[coco.annToMask(ann) > 0] = value
    return mask


@dataclass
class CocoMaskListing:
    """``data.format: coco``: each row names its annotation file and image id; masks are rasterised from the JSON."""

    rows: list[dict]
    cocos: dict[str, Any]  # annotation file -> pycocotools COCO
    orphan_masks: list[str] = field(default_factory=list)

    def class_names(self) -> list[str]:
        """``background`` and the categories of every file, by category id."""
        names = {}
        for coco in self.cocos.values():
            names.update({c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())})
        return ["background"] + [names[k] for k in sorted(names)]

    def mask_exists(self, row: dict) -> bool:
        return True

    def read(self, row: dict, names: Callable[[], list[str]], ignore_index: int, masks: Callable[[], MaskReader],
             unknown: list | None = None) -> tuple[np.ndarray, dict]:
        mask = coco_class_mask(self.cocos[row["ann_file"]], row["image_id"], names(), ignore_index, unknown)
        return mask, {"mode": "L", "channels": 1, "converted": False, "undeclared_colors": []}


def _load_coco(ann_file: Path, template: str) -> Any:
    from pycocotools.coco import COCO

    if not ann_file.is_file():
        raise DataError(f"{ann_file} is missing (rule: format coco needs data.options.annotations, "
                        f"'{template}' with {{split}} = train, val, test)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            return COCO(str(ann_file))
    except Exception as err:  # noqa: BLE001 - any parse error is a bad file
        raise DataError(f"{ann_file}: not readable as COCO JSON ({type(err).__name__}: {err})") from None


@register("segmentation", "coco")
def list_coco(data) -> CocoMaskListing:
    """Every image of the annotation files (one per split, or one for split_from=seed), by image id."""
    o, root = data.options, Path(data.path)
    files = {s: root / o.annotations.format(split=s) for s in SPLITS} if data.split_from == "folders" \
        else {None: root / o.annotations.format(split="all")}
    cocos, rows = {}, []
    for split, ann_file in files.items():
        coco = cocos[str(ann_file)] = _load_coco(ann_file, o.annotations)
        for image_id in sorted(coco.imgs):
            info = coco.imgs[image_id]
            rows.append({"path": str(root / o.images_dir / info["file_name"]), "split": split,
                         "ann_file": str(ann_file), "image_id": image_id,
                         "mask_source": f"{ann_file}#image_id={image_id}",
                         "declared_width": info.get("width"), "declared_height": info.get("height")})
    return CocoMaskListing(assign_splits(rows, data) if data.split_from == "seed" else rows, cocos)


# ---------------------------------------------------------------- validation facts


def mask_facts(listing: MaskFolderListing | CocoMaskListing, row: dict, names: list[str], ignore_index: int,
               reader: MaskReader) -> dict:
    """One row of the validation table about a row's mask: read or not (the error), its size, mode and colours,
    the values outside the classes, and the pixels per class (``counts``)."""
    n_classes = len(names)
    facts = {"mask_exists": True, "mask_decodes": False, "mask_width": 0, "mask_height": 0, "mask_mode": "",
             "mask_channels": 0, "mask_converted": False, "undeclared_colors": "", "bad_values": "",
             "values_ok": False, "foreground_pixels": 0, "labelled_pixels": 0, "mask_error": "", "counts": None}
    try:
        unknown: list[str] = []
        if not listing.mask_exists(row):
            return {**facts, "mask_exists": False}
        mask, extra = listing.read(row, lambda: names, ignore_index, lambda: reader, unknown)
    except Exception as err:  # noqa: BLE001 - unreadable mask or annotation is reported, not raised
        facts["mask_error"] = f"{type(err).__name__}: {err}"
        return facts
    values, counts = np.unique(mask, return_counts=True)
    bad = [int(v) for v in values if not (0 <= v < n_classes or v == ignore_index)]
    per_class = np.zeros(n_classes, dtype=np.int64)
    ok = (values >= 0) & (values < n_classes)
    per_class[values[ok]] = counts[ok]
    facts.update(mask_decodes=True, mask_height=mask.shape[0], mask_width=mask.shape[1], mask_mode=extra["mode"],
                 mask_channels=extra["channels"], mask_converted=extra["converted"],
                 undeclared_colors=" ".join(f"rgb{c}".replace(" ", "") for c in extra["undeclared_colors"][:5]),
                 bad_values=" ".join([*map(str, [v for v in bad if v >= 0][:10]), *sorted(set(unknown))]),
                 values_ok=not bad,
                 foreground_pixels=int(per_class[1:].sum()), labelled_pixels=int(per_class.sum()), counts=per_class)
    return facts
