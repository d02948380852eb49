"""Tiny detection settings and data helpers shared by the detection tests."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import REPO

BCCD = (REPO / ".." / "shared" / "datasets" / "bccd" / "BCCD").resolve()
BCCD_MISSING = f"BCCD not found at {BCCD} (REPO/../shared/datasets/bccd): the real-data detection test needs it"

# 64 px scenes, a tiny Faster R-CNN, one thread: a pipeline run takes seconds per stage
DET = {
    "tasks.detection.image_size": 64,
    "tasks.detection.model.options.anchor_size": 12,
    "tasks.detection.train.epochs": 2,
    "tasks.detection.train.batch_size": 4,
    "tasks.detection.train.eval_batch_size": 8,
    "tasks.detection.overfit_check.steps": 10,
    "tasks.detection.overfit_check.max_loss": 10.0,
    "tasks.detection.preview_samples": 4,
    "tasks.detection.options.report_images": 2,
}


def det_params(project, **extra):
    return project.params(**{**DET, **extra})


def annotation_file(project, split: str = "train") -> Path:
    return project.shapes / "scenes" / "annotations" / f"{split}.json"


def edit_coco(project, edit, split: str = "train") -> dict:
    """Load a split's COCO JSON, let ``edit(coco)`` change it, write it back."""
    path = annotation_file(project, split)
    coco = json.loads(path.read_text())
    edit(coco)
    path.write_text(json.dumps(coco))
    return coco


def coco_to_voc(scenes: Path, out: Path) -> Path:
    """The synthetic scenes written as a Pascal VOC folder (XML per image, ImageSets/Main lists)."""
    import shutil

    (out / "Annotations").mkdir(parents=True)
    (out / "JPEGImages").mkdir()
    (out / "ImageSets" / "Main").mkdir(parents=True)
    for split in ("train", "val", "test"):
        coco = json.loads((scenes / "annotations" / f"{split}.json").read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        ids = []
        for im in coco["images"]:
            stem = f"{split}_{Path(im['file_name']).stem}"
            ids.append(stem)
            shutil.copy(scenes / "images" / im["file_name"], out / "JPEGImages" / f"{stem}.png")
            objs = "".join(
                f"<object><name>{names[a['category_id']]}</name><difficult>0</difficult><bndbox><xmin>{a['bbox'][0]}</xmin>"
                f"<ymin>{a['bbox'][1]}</ymin><xmax>{a['bbox'][0] + a['bbox'][2]}</xmax><ymax>{a['bbox'][1] + a['bbox'][3]}</ymax>"
                f"</bndbox></object>"
                for a in coco["annotations"]
                if a["image_id"] == im["id"]
            )
            (out / "Annotations" / f"{stem}.xml").write_text(
                f"<annotation><filename>{stem}.png</filename><size><width>{im['width']}</width><height>{im['height']}</height>"
                f"<depth>3</depth></size>{objs}</annotation>"
            )
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return out
