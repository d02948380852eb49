"""One detector per layout the readers support. Each looks at one folder (``root``) and returns the readings
that fit it and the near misses (the closest layout and what is missing). They only look: nothing is read
in full here, the task's own reader does that when the reading is validated."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import yaml

from cv_models.data.layout_facts import (
    Miss, Reading, images_in, is_image, label_like, listing, rel, split_names, split_of, split_token, splits_present, subdirs,
)

Found = list  # of Reading | Miss

SPLITS = ("train", "val", "test")


def _with_images(folder: Path) -> list[Path]:
    return [d for d in subdirs(folder) if images_in(d)]


def _stems(folder: Path) -> set[str]:
    return {p.stem for p in images_in(folder)}


MASK_SUFFIXES = ("", "_L", "_mask", "_label", "_gt", "_seg")  # mask file = image stem + one of these


def _shared(images: set[str], masks: set[str]) -> tuple[set[str], str]:
    """The image stems that have a mask, with the mask suffix that pairs the most."""
    return max((({s for s in images if s + suffix in masks}, suffix) for suffix in MASK_SUFFIXES), key=lambda t: len(t[0]))


def _paired(folders: list[Path]) -> bool:
    """Two folders holding the same file names (up to a mask suffix): images and their masks, not two classes."""
    stems = [_stems(f) for f in folders]
    return any(len(_shared(a, b)[0]) > 0.5 * min(len(a), len(b)) for x, a in enumerate(stems) for y, b in enumerate(stems)
               if x != y)


# ------------------------------------------------------------------ ImageFolder
def imagefolder(root: Path) -> Found:
    """``root/<class>/*`` (a seeded split) or ``root/{train,val,test}/<class>/*``."""
    dirs = {d.name: d for d in subdirs(root)}
    split_dirs = {split_of(n): d for n, d in dirs.items() if split_of(n)}
    if "train" in split_dirs and _with_images(split_dirs["train"]):
        classes = _with_images(split_dirs["train"])
        if _paired(classes):
            return []
        missing = [s for s in SPLITS if s not in dirs]
        if missing:
            return [Miss("ImageFolder with split folders", 0.8, f"the folders {missing} under {root} (the reader needs "
                         f"train/, val/ and test/ by those names; found {sorted(dirs)})", root)]
        data = {"format": "imagefolder", "path": str(root), "classes": None, "split_from": "folders"}
        return [Reading("classification", "imagefolder", data, f"train/ val/ test/ hold {len(classes)} class folders of images")]
    classes = _with_images(root)
    siblings = [d for d in subdirs(root.parent) if d != root and split_of(d.name)] if split_of(root.name) else []
    if len(classes) >= 2 and not split_dirs and not siblings and not _paired(classes):
        data = {"format": "imagefolder", "path": str(root), "classes": None, "split_from": "seed"}
        return [Reading("classification", "imagefolder", data,
                        f"{len(classes)} class folders of images ({', '.join(d.name for d in classes[:6])}"
                        f"{', ...' if len(classes) > 6 else ''}), no split folders: a seeded split")]
    if len(classes) == 1 and not images_in(root):
        return [Miss("ImageFolder", 0.4, f"a second class folder next to {classes[0]} (one folder per class)", root)]
    return []


# ------------------------------------------------------------------ COCO JSON
def _coco_files(root: Path) -> list[tuple[Path, dict]]:
    out = []
    for folder in (root, root / "annotations"):
        for p in listing(folder)[1] if folder.is_dir() else ():
            if p.suffix.lower() != ".json" or p.stat().st_size > 2_000_000_000:
                continue
            try:
                doc = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and {"images", "annotations"} <= set(doc):
                out.append((p, doc))
    return out


def _coco_images(root: Path, doc: dict, token: str) -> str | None:
    """The folder the file names are relative to, as a template ({split} for the split's folder)."""
    first = next((im["file_name"] for im in doc["images"] if "file_name" in im), None)
    if first is None:
        return None
    for template in ("images", "{split}", "images/{split}", "."):
        if (root / template.format(split=token) / first).is_file():
            return template
    return None


def coco(root: Path) -> Found:
    files = _coco_files(root)
    if not files:
        return []
    if any(not doc.get("annotations") or "bbox" not in doc["annotations"][0] for _, doc in files):
        return [Miss("COCO JSON", 0.6, "boxes ('bbox') in the annotations (COCO panoptic or captions are not read)", root)]
    found: dict[str, str] = {}
    template = None
    for path, _ in files:
        name = rel(path, root)
        hit = split_token(path.stem)
        if hit is None:
            found, template = {"train": path.stem}, name.replace(path.stem, "{split}")  # one file: a seeded split
            break
        found[hit[0]] = hit[1]
        template = name.replace(hit[1], "{split}")
    token = found.get("train", next(iter(found.values())))
    first = next((doc for path, doc in files if token in path.stem), files[0][1])
    images = _coco_images(root, first, token)
    if images is None:
        return [Miss("COCO JSON", 0.7, f"the image files named in {files[0][0]} (looked in images/, the split's folder, "
                     f"images/<split>/ and {root})", root)]
    masks = any(a.get("segmentation") for _, doc in files for a in doc["annotations"][:200])
    split_from = "folders" if set(found) == set(SPLITS) else "seed"
    options = {"annotations": template, "images": images, "splits": split_names(found)}
    data = {"format": "coco", "path": str(root), "classes": None, "split_from": split_from,
            "options": {k: v for k, v in options.items() if v is not None}}
    what = "boxes and masks (polygons or RLE)" if masks else "boxes only"
    evidence = f"COCO JSON {template} for splits {sorted(found)} with {what}"
    return [Reading("instance_segmentation" if masks else "detection", "coco", data, evidence,
                    ("detection",) if masks else ())]


# ------------------------------------------------------------------ Pascal VOC XML
def voc(root: Path) -> Found:
    ann = root / "Annotations"
    if not (ann.is_dir() and any(p.suffix == ".xml" for p in listing(ann)[1])):
        return []
    if not images_in(root / "JPEGImages"):
        return [Miss("Pascal VOC", 0.7, f"{root / 'JPEGImages'} with the images the XML files name", root)]
    lists = root / "ImageSets" / "Main"
    present = splits_present([p.stem for p in listing(lists)[1] if p.suffix == ".txt"])
    if "train" not in present:
        return [Miss("Pascal VOC", 0.8, f"split lists {lists}/train.txt (and val.txt, test.txt)", root)]
    suffix = images_in(root / "JPEGImages")[0].suffix
    options = {"annotations": "Annotations", "images": "JPEGImages", "split_files": "ImageSets/Main/{split}.txt",
               "image_suffix": suffix, "splits": split_names(present)}
    data = {"format": "voc", "path": str(root), "classes": None,
            "split_from": "folders" if set(present) == set(SPLITS) else "seed",
            "options": {k: v for k, v in options.items() if v is not None}}
    return [Reading("detection", "voc", data, f"Pascal VOC XML boxes in Annotations/, lists for {sorted(present)}")]


# ------------------------------------------------------------------ YOLO txt
def _label_kind(folder: Path) -> tuple[str, int] | None:
    """('polygons' | 'boxes', highest class id) from a sample of label files."""
    files = [p for p in listing(folder)[1] if p.suffix == ".txt"][:50]
    numbers, top = [], -1
    for p in files:
        for line in p.read_text(errors="replace").splitlines():
            parts = line.split()
            if parts:
                numbers.append(len(parts) - 1)
                top = max(top, int(float(parts[0])) if parts[0].replace(".", "", 1).isdigit() else top)
    if not numbers:
        return None
    return ("polygons" if max(numbers) > 4 else "boxes"), top


def _names_yaml(folder: Path) -> Path | None:
    for p in listing(folder)[1]:
        if p.suffix in (".yaml", ".yml"):
            try:
                doc = yaml.safe_load(p.read_text())
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(doc, dict) and "names" in doc:
                return p
    return None


def _yolo_reading(root: Path, labels: Path, images: Path) -> Found:
    found = splits_present([d.name for d in subdirs(labels) if (images / d.name).is_dir()])
    if "train" not in found:
        return [Miss("YOLO", 0.7, f"split folders under {labels} matching those under {images} (labels/<split>, "
                     f"images/<split>)", root)]
    kind = _label_kind(labels / found["train"])
    if kind is None:
        return []
    options = {"images": rel(images, root) + "/{split}", "labels": rel(labels, root) + "/{split}", "splits": split_names(found)}
    names = _names_yaml(labels.parent)
    classes = None
    if names:
        options["data_yaml"] = rel(names, root)
    else:
        classes = [f"class_{k}" for k in range(kind[1] + 1)]
    data = {"format": "yolo", "path": str(root), "classes": classes,
            "split_from": "folders" if set(found) == set(SPLITS) else "seed",
            "options": {k: v for k, v in options.items() if v is not None}}
    polygons = kind[0] == "polygons"
    evidence = (f"YOLO txt {kind[0]} in {rel(labels, root)}/ beside {rel(images, root)}/, splits {sorted(found)}"
                + ("" if names else "; no names list: classes named by id"))
    return [Reading("instance_segmentation" if polygons else "detection", "yolo", data, evidence,
                    ("detection",) if polygons else (), {"names_from": "data yaml" if names else "ids"})]


def yolo(root: Path) -> Found:
    """images/<split>/ + labels/<split>/ (labels/ may sit one folder down, beside a data yaml)."""
    images = root / "images"
    if not images.is_dir():
        return []
    out: Found = []
    for labels in [root / "labels", *(d / "labels" for d in subdirs(root))]:
        if labels.is_dir():
            out += _yolo_reading(root, labels, images)
    return out


# ------------------------------------------------------------------ mask folders (semantic segmentation)
def _image_dirs(root: Path, depth: int = 3) -> list[Path]:
    out, level = [], [root]
    for _ in range(depth):
        level = [d for f in level for d in subdirs(f)][:400]
        out += [d for d in level if images_in(d)]
    return out


def _partner(masks: Path, candidates: list[Path]) -> tuple[Path, str] | None:
    """The image folder whose file names the masks share (mask = image stem + suffix), nearest first."""
    mask_stems = _stems(masks)
    best = None
    for images in candidates:
        if images == masks or label_like(images):
            continue
        stems = _stems(images)
        shared, suffix = _shared(stems, mask_stems)
        if shared and len(shared) >= 0.9 * min(len(stems), len(mask_stems)):
            distance = len(images.parts) + len(masks.parts) - 2 * len(_common(images, masks))
            if best is None or distance < best[0]:
                best = (distance, images, suffix)
    return (best[1], best[2]) if best else None


def _common(a: Path, b: Path) -> tuple[str, ...]:
    parts = []
    for x, y in zip(a.parts, b.parts):
        if x != y:
            break
        parts.append(x)
    return tuple(parts)


def _template(path: str) -> tuple[str, tuple[str, str] | None]:
    parts = path.split("/")
    for k, part in enumerate(parts):
        for token in (part, part.removesuffix("annot")):
            split = split_of(token)
            if split:
                parts[k] = part.replace(token, "{split}")
                return "/".join(parts), (split, token)
    return path, None


def mask_folders(root: Path) -> Found:
    dirs = _image_dirs(root)
    pairs: dict[tuple[str, str, str], dict[str, str]] = {}
    for masks in dirs:
        facts = label_like(masks)
        partner = _partner(masks, dirs) if facts else None
        if partner is None or Path(*_common(partner[0], masks)) != root:
            continue
        image_t, split = _template(rel(partner[0], root))
        mask_t, split2 = _template(rel(masks, root))
        key = (image_t, mask_t, partner[1] + ".png")
        pairs.setdefault(key, {}).update({split[0]: split[1]} if split and split2 else {})
        pairs[key].setdefault("_values", set()).update(facts[1])  # type: ignore[union-attr]
        pairs[key]["_mode"] = facts[0]
    return [_mask_reading(root, *key, splits) for key, splits in pairs.items()]


def _mask_reading(root: Path, images: str, masks: str, suffix: str, found: dict) -> Reading:
    values, mode = sorted(found.pop("_values")), found.pop("_mode")
    options: dict = {"images_dir": images, "masks_dir": masks, "mask_suffix": suffix}
    split_list = root / "ImageSets" / "Segmentation"
    lists = splits_present([p.stem for p in listing(split_list)[1] if p.suffix == ".txt"])
    if lists:
        found = lists
        options["split_list"] = "ImageSets/Segmentation/{split}.txt"
        options["image_suffix"] = images_in(root / images)[0].suffix if "{" not in images else ".jpg"
    if found and split_names(found):
        options["splits"] = found
    if mode == "RGB":  # a colour per class, black first
        colors = [[v >> 16, (v >> 8) & 255, v & 255] for v in values]
        classes, value_map, ignore = [f"color_{r}_{g}_{b}" for r, g, b in colors], None, []
        options["colors"] = colors
    else:
        classes, value_map, ignore = mask_classes(values)
    if value_map:
        options["value_map"] = value_map
    if ignore:
        options["ignore_values"] = ignore
    if mode == "P":
        options["palette_as_index"] = True
    split_from = "folders" if set(found) == set(SPLITS) else "seed"
    data = {"format": "mask_folder", "path": str(root), "classes": classes, "split_from": split_from, "options": options}
    shown = [tuple(c) for c in options.get("colors", [])] or values
    evidence = (f"label masks ({mode} mode, values {shown[:12]}{' ...' if len(values) > 12 else ''}) in {masks} "
                f"share file names with the images in {images}")
    return Reading("segmentation", "mask_folder", data, evidence, (), {"mask_values": values, "ignore_values": ignore})


def mask_classes(values: list[int]) -> tuple[list[str], dict[int, int] | None, list[int]]:
    """Class names (by mask value), a value map and ignore values from the values the masks hold: 0/255 masks
    are binary; 255 beside small values is the ignore value (VOC's boundary); a value apart from the
    contiguous run 0..k (by a gap of two or more) is an unlabelled value (SegNet's void)."""
    if values == [0, 255] or values == [255]:
        return ["value_0", "value_255"], {255: 1}, []
    if values == [0, 1] or values == [0]:
        return ["value_0", "value_1"], None, []
    ignore = [v for v in values if v == 255 and len(values) > 1]
    rest = [v for v in values if v not in ignore]
    run = [v for v in rest if v <= len(rest) + 1]  # the contiguous run from 0, small gaps allowed
    top = max(run) if run else 0
    ignore += [v for v in rest if v > top]
    return [f"value_{k}" for k in range(top + 1)], None, sorted(ignore)


# ------------------------------------------------------------------ per-instance mask folders
def instance_folders(root: Path) -> Found:
    """``<id>/images/<id>.png`` + ``<id>/masks/*.png`` per image (split folders or a seeded split)."""
    def items(folder: Path) -> int:
        return sum(1 for d in subdirs(folder)[:50] if (d / "images").is_dir() and (d / "masks").is_dir())

    dirs = {d.name: d for d in subdirs(root)}
    if all(s in dirs for s in SPLITS) and all(items(dirs[s]) for s in SPLITS):
        split_from = "folders"
    elif items(root) >= 2:
        split_from = "seed"
    else:
        return []
    data = {"format": "instance_folders", "path": str(root), "classes": None, "split_from": split_from,
            "options": {"class_name": "object"}}
    return [Reading("instance_segmentation", "instance_folders", data,
                    "one folder per image holding images/ (the picture) and masks/ (one binary PNG per instance)")]


def loose_images(root: Path) -> Found:
    """Images with nothing that labels them: the closest layout is a folder per class."""
    files = [p for p in listing(root)[1] if is_image(p)]
    if len(files) >= 2 and not subdirs(root):
        return [Miss("ImageFolder", 0.3, f"labels: {len(files)} images lie in {root} with no class folders, masks or "
                     f"annotation files (put them in one folder per class, or add annotations)", root)]
    return []


# every layout the readers support, tried on each folder; a new layout is one more function here
DETECTORS: list[Callable[[Path], Found]] = [imagefolder, coco, voc, yolo, mask_folders, instance_folders, loose_images]
