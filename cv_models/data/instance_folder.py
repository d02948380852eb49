"""The per-instance mask layout common in microscopy sets (e.g. the Data Science Bowl 2018 nuclei):

    <root>/<image_id>/images/<image_id>.png     the image (one file; any common image suffix)
    <root>/<image_id>/masks/<anything>.png      one binary PNG per instance (0 = background)

Either ``<root>`` holds the image folders directly and the splits are drawn by seed
(``data.split_from: seed``), or ``<root>/train``, ``<root>/val`` and ``<root>/test`` each hold
image folders (``data.split_from: folders``). All instances belong to one class.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cv_models.base import DataError
from cv_models.data.probe import IMAGE_SUFFIXES

SPLITS = ("train", "val", "test")


def _image_folders(parent: Path) -> list[Path]:
    return sorted(d for d in parent.iterdir() if d.is_dir() and (d / "images").is_dir())


def _record(folder: Path, split: str, image_id: int) -> dict:
    images = sorted(p for p in (folder / "images").iterdir() if p.is_file())
    masks_dir = folder / "masks"
    masks = sorted(p for p in masks_dir.iterdir() if p.is_file()) if masks_dir.is_dir() else []
    if len(images) != 1:
        # no image or several: validation reports the folder under the 'one image per folder' rule
        image = images[0] if images else folder / "images"
    else:
        image = images[0]
    return {
        "image_id": image_id, "path": str(image), "file_name": str(image), "split": split, "folder": str(folder),
        "n_image_files": len(images), "width": None, "height": None,
        "instances": [{"ann_id": k + 1, "category_id": 1, "bbox": None, "png": str(m),
                       "source": str(m)} for k, m in enumerate(masks)],
    }


def list_instance_folders(root: Path, split_from: str, fractions: dict[str, float], seed: int) -> list[dict]:
    """One record per image folder: image path, split and the instance PNGs (not yet read)."""
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not an existing folder (rule: data.path must be an existing folder)")
    if split_from == "folders":
        missing = [s for s in SPLITS if not (root / s).is_dir()]
        if missing:
            raise DataError(f"{root}: split folder(s) {missing} missing (rule: split_from=folders needs {root}/train, "
                            f"val and test holding <id>/images and <id>/masks folders; or use split_from: seed)")
        groups = [(s, _image_folders(root / s)) for s in SPLITS]
    else:
        folders = _image_folders(root)
        order = np.random.default_rng(seed).permutation(len(folders))
        n_train, n_val = round(len(folders) * fractions["train"]), round(len(folders) * fractions["val"])
        split_of = {int(idx): "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
                    for rank, idx in enumerate(order)}
        groups = [(s, [f for i, f in enumerate(folders) if split_of[i] == s]) for s in SPLITS]
    records = [_record(f, split, 0) for split, folders in groups for f in folders]
    if not records:
        raise DataError(f"{root}: no image folders found (rule: per-instance layout needs <id>/images/<file> and "
                        f"<id>/masks/*.png folders)")
    for i, r in enumerate(records):
        r["image_id"] = i + 1
    return records


def is_image_file(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES
