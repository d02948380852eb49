"""Tiny datasets in the layouts users bring (issue 12), written from the synthetic scenes: the same
images and objects, only the folders and file formats change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")


def scenes_coco(scenes: Path, split: str) -> dict:
    return json.loads((scenes / "annotations" / f"{split}.json").read_text())


def coco_standard(scenes: Path, out: Path, names: dict[str, str]) -> Path:
    """train2017/ + annotations/instances_train2017.json (file_name is the bare file name)."""
    (out / "annotations").mkdir(parents=True)
    for split in SPLITS:
        coco = scenes_coco(scenes, split)
        (out / names[split]).mkdir()
        for im in coco["images"]:
            shutil.copy(scenes / "images" / im["file_name"], out / names[split] / Path(im["file_name"]).name)
            im["file_name"] = Path(im["file_name"]).name
        (out / "annotations" / f"instances_{names[split]}.json").write_text(json.dumps(coco))
    return out


def yolo(scenes: Path, out: Path, polygons: bool = False, names: dict[str, str] | None = None) -> list[str]:
    """images/<split>/ + labels/<split>/ txt files (normalised; boxes, or the box outline as a polygon)."""
    names = names or {s: s for s in SPLITS}
    classes = []
    for split in SPLITS:
        coco = scenes_coco(scenes, split)
        classes = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
        (out / "images" / names[split]).mkdir(parents=True)
        (out / "labels" / names[split]).mkdir(parents=True)
        for im in coco["images"]:
            stem = Path(im["file_name"]).stem
            shutil.copy(scenes / "images" / im["file_name"], out / "images" / names[split] / f"{stem}.png")
            w, h = im["width"], im["height"]
            lines = []
            for a in coco["annotations"]:
                if a["image_id"] != im["id"]:
                    continue
                x, y, bw, bh = a["bbox"]
                if polygons:
                    pts = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
                    coords = [v / (w if k % 2 == 0 else h) for k, v in enumerate(pts)]
                else:
                    coords = [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]
                lines.append(" ".join([str(a["category_id"] - 1)] + [f"{v:.6f}" for v in coords]))
            (out / "labels" / names[split] / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return classes


def copy_masks(
    scenes: Path, images_to: dict[str, Path], masks_to: dict[str, Path], mask_suffix: str = ".png", convert=None
) -> None:
    """Every split's image and class-index mask into the folders given (``convert(mask) -> PIL image``)."""
    for split in SPLITS:
        images_to[split].mkdir(parents=True, exist_ok=True)
        masks_to[split].mkdir(parents=True, exist_ok=True)
        for p in sorted((scenes / "images" / split).iterdir()):
            shutil.copy(p, images_to[split] / p.name)
            mask = np.asarray(Image.open(scenes / "masks" / split / p.name))
            picture = convert(mask) if convert else Image.fromarray(mask, mode="L")
            picture.save(masks_to[split] / (p.stem + mask_suffix))


def instance_folders(scenes: Path, root: Path) -> Path:
    """``<id>/images/<id>.png`` + ``<id>/masks/<k>.png`` (DSB 2018 nuclei) from the embedded scenes, every split."""
    from cv_models.data.coco import decode_mask

    for split in SPLITS:
        coco = scenes_coco(scenes, split)
        for im in coco["images"]:
            folder = root / f"{split}_{im['id']}"
            (folder / "images").mkdir(parents=True)
            (folder / "masks").mkdir()
            Image.open(scenes / "images" / im["file_name"]).save(folder / "images" / f"{split}_{im['id']}.png")
            for a in (a for a in coco["annotations"] if a["image_id"] == im["id"]):
                m = decode_mask(a["segmentation"], im["height"], im["width"])
                Image.fromarray((m * 255).astype(np.uint8)).save(folder / "masks" / f"{a['id']}.png")
    return root
