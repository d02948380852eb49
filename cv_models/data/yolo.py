"""Ultralytics YOLO txt reader (``data.format: yolo``) into the shared annotation table.

One label file per image, same stem, one object per line, coordinates normalised to [0, 1]::

    detection             <class> <cx> <cy> <w> <h>
    instance segmentation <class> <x1> <y1> <x2> <y2> ... (a polygon, at least 3 points)

Two ways to say where the files are:

* ``data.options.data_yaml: data.yaml`` (Ultralytics' data file, relative to ``data.path``): ``path``
  (relative to the yaml's folder), ``train`` / ``val`` / ``test`` image folders relative to ``path``,
  and ``names`` (a list, or a dict id -> name; ids need not be contiguous). Label folders are the image
  folders with their last ``images`` part replaced by ``labels``, as Ultralytics does.
* or the templates ``data.options.images: images/{split}`` and ``labels: labels/{split}`` with the class
  names in ``data.classes`` (class id k = ``classes[k]``), ``data.options.names``, or the ``names`` of a
  ``data_yaml`` (given templates take the place of the yaml's folders).

Label files without an image and images without a label file are reported (an image without labels
trains as background, as in Ultralytics). A malformed line or a class id outside the names fails with
the file and line named.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from PIL import Image

from cv_models.base import DataError
from cv_models.data.annotations import AnnotationTables, build_tables, check_split_names
from cv_models.data.probe import IMAGE_SUFFIXES

DEFAULT_SPLITS = {"train": "train", "val": "val", "test": "test"}


def _names(raw, where: str) -> dict[int, str]:
    if isinstance(raw, list):
        return {k: str(n) for k, n in enumerate(raw)}
    if isinstance(raw, dict):
        try:
            return {int(k): str(v) for k, v in raw.items()}
        except (TypeError, ValueError):
            pass
    raise DataError(f"{where}: 'names' must be a list of class names or a mapping id -> name, got {raw!r}")


def _labels_dir(images_dir: Path) -> Path:
    """Ultralytics' rule: the last 'images' part of the image folder becomes 'labels'."""
    parts = list(images_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    raise DataError(f"{images_dir}: image folder has no 'images' part to swap for 'labels' (rule: YOLO label folders "
                    f"mirror the image folders: images/<split> -> labels/<split>)")


def read_data_yaml(root: Path, data_yaml: str) -> tuple[dict[str, Path], dict[int, str], Path]:
    """(split -> image folder, id -> name, the yaml file) of an Ultralytics data yaml."""
    path = root / data_yaml
    if not path.is_file():
        raise DataError(f"{path}: data yaml does not exist (rule: data.options.data_yaml is relative to data.path)")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(cfg, dict) or "names" not in cfg:
        raise DataError(f"{path}: not a YOLO data yaml (rule: a mapping with 'names' and image folders 'train', 'val')")
    # 'path' is taken relative to the yaml's folder (not the working directory), so the file works from anywhere
    base = path.parent / str(cfg.get("path") or ".")
    folders = {}
    for split in ("train", "val", "test"):
        value = cfg.get(split)
        if value in (None, ""):
            continue
        if not isinstance(value, str):
            raise DataError(f"{path}: '{split}' must be one image folder (a list of folders or a .txt list is not "
                            f"supported here), got {value!r}")
        folders[split] = base / value
    return folders, _names(cfg["names"], str(path)), path


def _read_label_file(path: Path, names: dict[int, str], polygons: bool) -> list[dict]:
    objects = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable label file ({err})") from None
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            cid, coords = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            raise DataError(f"{path}:{n}: not numbers (rule: a YOLO line is '<class id> <coordinates...>'), "
                            f"got {line.strip()!r}") from None
        if cid not in names:
            raise DataError(f"{path}:{n}: class id {cid} is not in the names list (ids {min(names)}..{max(names)}, "
                            f"{len(names)} names) (rule: class ids index data.yaml's names / data.classes)")
        if polygons:
            if len(coords) < 6 or len(coords) % 2:
                raise DataError(f"{path}:{n}: {len(coords)} coordinates (rule: a YOLO segment line is '<class> x1 y1 "
                                f"x2 y2 ...' with at least 3 points; box lines 'cls cx cy w h' carry no mask)")
        elif len(coords) != 4 and (len(coords) < 6 or len(coords) % 2):
            raise DataError(f"{path}:{n}: {len(coords)} coordinates (rule: a YOLO box line is '<class> cx cy w h', "
                            f"or a polygon with at least 3 points)")
        objects.append({"line": n, "class_id": cid, "coords": coords})
    return objects


def _missing_folder(folder: Path, split: str) -> DataError:
    """Name a path part that is a file: git writes a symlink as a small text file holding its target when
    the checkout has no symlink support (core.symlinks=false, some archives, Windows)."""
    for part in [folder, *folder.parents]:
        if part.is_file() and part.stat().st_size < 256:
            text = part.read_text(errors="replace").strip()
            return DataError(f"{folder}: image folder of split '{split}' does not exist: {part} is a file holding "
                             f"{text!r}, a symlink saved as a plain file (recreate it with `ln -s {text} {part}`, or "
                             f"point data.options.images / labels past it)")
    return DataError(f"{folder}: image folder of split '{split}' does not exist (rule: YOLO images/<split> folders, set "
                     f"by data.options.images or the data yaml)")


def _locate(root: Path, classes: list[str] | None, data_yaml: str | None, images: str | None, labels: str | None,
            splits: dict[str, str] | None, names: list[str] | dict | None):
    """(split -> image folder, split -> label folder, split -> source named in the notes, id -> class name)."""
    if data_yaml and images is None and labels is None:
        folders, id_to_name, source = read_data_yaml(root, data_yaml)
        label_folders = {s: _labels_dir(f) for s, f in folders.items()}
        sources = {s: f"{source} ({s}: {f})" for s, f in folders.items()}
        return folders, label_folders, sources, id_to_name
    splits = splits or DEFAULT_SPLITS
    check_split_names(splits, "yolo")
    images, labels = images or "images/{split}", labels or "labels/{split}"
    folders = {s: root / images.format(split=name) for s, name in splits.items()}
    label_folders = {s: root / labels.format(split=name) for s, name in splits.items()}
    if data_yaml:  # the yaml's names, the templates' folders
        id_to_name = read_data_yaml(root, data_yaml)[1]
    else:
        raw = names if names is not None else classes
        if not raw:
            raise DataError("yolo: the class names are needed (rule: data.options.data_yaml with 'names', or "
                            "data.classes in class-id order)")
        id_to_name = _names(raw, "data.options.names / data.classes")
    return folders, label_folders, {s: str(f) for s, f in folders.items()}, id_to_name


def _box_row(o: dict, size: tuple[int, int], item: str, split: str, rel: Path, category: str, with_masks: bool) -> dict:
    """One label line as an annotation row: pixel corners (a polygon gives its extent), the polygon kept in pixels."""
    c, (w, h) = o["coords"], size
    if len(c) == 4:
        cx, cy, bw, bh = c
        x0, y0, x1, y1 = (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h
    else:
        xs, ys = [v * w for v in c[0::2]], [v * h for v in c[1::2]]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    # six-decimal normalised text lands a hair outside the edge: clip up to half a pixel, report more
    x0, y0 = (0.0 if -0.5 < x0 < 0 else x0), (0.0 if -0.5 < y0 < 0 else y0)
    x1, y1 = (float(w) if w < x1 < w + 0.5 else x1), (float(h) if h < y1 < h + 0.5 else y1)
    row = {"item": item, "split": split, "ann_id": f"{rel}#{o['line']}", "image_id": str(rel.with_suffix("")),
           "file_name": str(rel), "category": category, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "iscrowd": 0,
           "area": max(x1 - x0, 0) * max(y1 - y0, 0)}
    if with_masks:
        row["segmentation"] = [[v * (w if k % 2 == 0 else h) for k, v in enumerate(c)]]
    return row


def _split_notes(split: str, folder: Path, label_dir: Path, without: list[str], stems: set[str]) -> list[str]:
    """Images without a label file, label files without an image, a missing label folder."""
    notes = []
    if without:
        notes.append(f"{split}: {len(without)} image(s) without a label file under {label_dir} (trained as "
                     f"background): " + ", ".join(without[:10]) + (" ..." if len(without) > 10 else ""))
    orphans = sorted(str(q.relative_to(label_dir)) for q in label_dir.rglob("*.txt")
                     if str(q.relative_to(label_dir).with_suffix("")) not in stems) if label_dir.is_dir() else []
    if orphans:
        notes.append(f"{split}: {len(orphans)} label file(s) without an image in {folder} (not used): "
                     + ", ".join(orphans[:10]) + (" ..." if len(orphans) > 10 else ""))
    if not label_dir.is_dir():
        notes.append(f"{split}: label folder {label_dir} does not exist (every image trains as background)")
    return notes


def _read_split(split: str, folder: Path, label_dir: Path, id_to_name: dict[int, str], with_masks: bool):
    """(image rows, annotation rows, notes) of one split's image folder and its label folder."""
    image_rows, box_rows = [], []
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    stems = set()
    without = []
    for p in files:
        rel = p.relative_to(folder)
        stems.add(str(rel.with_suffix("")))
        label = label_dir / rel.with_suffix(".txt")
        image_rows.append({"item": f"{folder.name}/{rel}", "split": split, "image_id": str(rel.with_suffix("")),
                           "file_name": str(rel), "image_root": folder})
        if not label.is_file():
            without.append(str(rel))
            continue
        objects = _read_label_file(label, id_to_name, polygons=with_masks)
        if not objects:
            continue
        with Image.open(p) as im:  # the header only: normalised coordinates need the size
            size = im.size
        box_rows += [_box_row(o, size, f"{label.relative_to(label_dir.parent)}:{o['line']}", split, rel,
                              id_to_name[o["class_id"]], with_masks) for o in objects]
    return image_rows, box_rows, _split_notes(split, folder, label_dir, without, stems)


def read_yolo(root: Path, classes: list[str] | None = None, data_yaml: str | None = None,
              images: str | None = None, labels: str | None = None, splits: dict[str, str] | None = None,
              names: list[str] | dict | None = None, with_masks: bool = False) -> AnnotationTables:
    """Read the splits present. ``with_masks``: lines are polygons (instance segmentation), kept as
    COCO-style pixel polygons in ``segmentation``; otherwise boxes (a polygon line gives its extent)."""
    folders, label_folders, sources, id_to_name = _locate(root, classes, data_yaml, images, labels, splits, names)
    image_rows, box_rows, notes = [], [], []
    for split, folder in folders.items():
        if not folder.is_dir():
            raise _missing_folder(folder, split)
        split_images, split_boxes, split_notes = _read_split(split, folder, label_folders[split], id_to_name, with_masks)
        image_rows += split_images
        box_rows += split_boxes
        notes += split_notes
    categories = [id_to_name[k] for k in sorted(id_to_name)]
    known = list(classes) if classes else categories
    t = build_tables(image_rows, box_rows, root, known, categories, sources)
    t.notes.extend(notes)
    return t
