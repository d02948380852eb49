"""Pascal VOC XML reader: splits from ``ImageSets/Main/<split>.txt``, one XML file per image,
into the shared annotation table::

    <path>/ImageSets/Main/{split}.txt   (data.options.split_files, a template with {split})
    <path>/Annotations/<id>.xml         (data.options.annotations)
    <path>/JPEGImages/<filename>        (data.options.images; <filename> from the XML, else <id>.jpg)
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from cv_models.base import DataError
from cv_models.data.annotations import AnnotationTables, build_tables, check_split_names, safe_relative

DEFAULT_SPLITS = {"train": "train", "val": "val", "test": "test"}


def _number(xml: Path, where: str, node, tag: str) -> float:
    text = node.findtext(tag) if node is not None else None
    try:
        return float(text)
    except (TypeError, ValueError):
        raise DataError(f"{xml}: {where} has no numeric <{tag}> (rule: VOC boxes have xmin, ymin, xmax, ymax), "
                        f"got {text!r}") from None


def parse_voc_xml(xml: Path) -> tuple[str | None, int, int, list[dict]]:
    """(filename, width, height, objects) of one VOC annotation file."""
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as err:
        raise DataError(f"{xml}: not valid XML ({err}) (rule: annotation file is valid Pascal VOC XML)") from None
    if root.tag != "annotation":
        raise DataError(f"{xml}: root element is <{root.tag}>, not <annotation> (rule: annotation file is valid Pascal VOC XML)")
    size = root.find("size")
    width = int(_number(xml, "<size>", size, "width")) if size is not None and size.findtext("width") else 0
    height = int(_number(xml, "<size>", size, "height")) if size is not None and size.findtext("height") else 0
    objects = []
    for k, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        where = f"object {k} ({name or 'no name'})"
        if box is None:
            raise DataError(f"{xml}: {where} has no <bndbox> (rule: every VOC object has a box)")
        objects.append({"k": k, "name": name, "difficult": int(obj.findtext("difficult") or 0),
                        **{t: _number(xml, where, box, t) for t in ("xmin", "ymin", "xmax", "ymax")}})
    filename = root.findtext("filename")
    return (filename.strip() if filename else None), width, height, objects


def read_voc(root: Path, classes: list[str] | None = None, annotations: str = "Annotations", images: str = "JPEGImages",
             split_files: str = "ImageSets/Main/{split}.txt", splits: dict[str, str] | None = None,
             image_suffix: str = ".jpg") -> AnnotationTables:
    """Read every split. ``classes`` declares the known class names (default: the train split's names, sorted).

    VOC's ``difficult`` objects are kept and marked crowd-like (``iscrowd=1``): COCO evaluation then neither
    rewards nor penalises detecting them, as the VOC protocol does.
    """
    splits = splits or DEFAULT_SPLITS
    check_split_names(splits, "voc")
    image_rows, box_rows, sources, train_names = [], [], {}, set()
    for split in [s for s in ("train", "val", "test") if s in splits]:  # the splits the mapping names
        list_file = root / split_files.format(split=splits[split])
        if not list_file.is_file():
            raise DataError(f"{list_file}: split list does not exist (rule: every split has an ImageSets list)")
        sources[split] = str(list_file)
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        for image_id in ids:
            where = f"{list_file.relative_to(root) if root in list_file.parents else list_file}: {image_id}"
            if not safe_relative(image_id):
                image_rows.append({"item": f"{where} (id escapes the dataset folder)", "split": split, "image_id": image_id,
                                   "file_name": image_id})
                continue
            xml = root / annotations.format(split=splits[split]) / f"{image_id}.xml"
            if not xml.is_file():
                raise DataError(f"{xml}: annotation file for {where} does not exist (rule: every listed image has a VOC XML file)")
            filename, width, height, objects = parse_voc_xml(xml)
            name = filename or image_id + image_suffix
            rel_xml = xml.relative_to(root)
            image_rows.append({"item": f"{rel_xml}: image {name}", "split": split, "image_id": image_id, "file_name": name,
                               "image_root": root / images.format(split=splits[split]),
                               "declared_width": width, "declared_height": height})
            for o in objects:
                if split == "train":
                    train_names.add(o["name"])
                box_rows.append({"item": f"{rel_xml}: object {o['k']} ({o['name']})", "split": split,
                                 "ann_id": f"{image_id}#{o['k']}", "image_id": image_id, "file_name": name,
                                 "category": o["name"], "x0": o["xmin"], "y0": o["ymin"], "x1": o["xmax"], "y1": o["ymax"],
                                 "iscrowd": o["difficult"],
                                 "area": max(o["xmax"] - o["xmin"], 0) * max(o["ymax"] - o["ymin"], 0)})
    categories = list(classes) if classes else sorted(train_names)
    return build_tables(image_rows, box_rows, root / images, categories, categories, sources)
