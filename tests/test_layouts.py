"""Every layout and format of issue 12 expressed by settings alone, on tiny data written in that
layout (tests/layout_helpers.py): nothing is moved or renamed to fit the pipeline."""
from __future__ import annotations

import json

import pytest

from cv_models import get_task
from cv_models.base import DataError
from tasks import validate
from tasks.config import load_params
from tests import layout_helpers as L
from tests.detection_helpers import det_params


def _report(task: str, params) -> dict:
    report = validate.run(task, params)
    assert report["success"], json.dumps([c for c in report["checks"] if not c["success"]], indent=1)
    return report


def _data(task: str, **data) -> dict:
    return {f"tasks.{task}.data.{k}": v for k, v in data.items()}


# ------------------------------------------------------------------ COCO
def test_standard_coco_layout(project, tmp_path):
    names = {"train": "train2017", "val": "val2017", "test": "test2017"}
    root = L.coco_standard(project.shapes / "scenes", tmp_path / "coco", names)
    options = {"annotations": "annotations/instances_{split}.json", "images": "{split}", "splits": names}
    report = _report("detection", det_params(project, **_data("detection", path=str(root), options=options)))
    assert report["n_samples"] == 24
    inst = load_params(project.params(**_data("instance_segmentation", path=str(root), options=options)))
    images, anns, _ = get_task("instance_segmentation", inst.task("instance_segmentation"))._tables()
    assert images["exists"].all() and anns["decodes"].all() and set(images["split"]) == {"train", "val", "test"}


def test_missing_image_names_the_path_tried(project, tmp_path):
    names = {"train": "train2017", "val": "val2017", "test": "test2017"}
    root = L.coco_standard(project.shapes / "scenes", tmp_path / "coco", names)
    victim = sorted((root / "val2017").iterdir())[0]
    victim.unlink()
    options = {"annotations": "annotations/instances_{split}.json", "images": "{split}", "splits": names}
    with pytest.raises(validate.ValidationFailed, match=f"tried {victim}"):
        validate.run("detection", det_params(project, **_data("detection", path=str(root), options=options)))


def test_symlinked_image_folder_is_followed(project, tmp_path):
    """A folder of links to images stored elsewhere is a normal layout: the file name is what is judged."""
    names = {"train": "train2017", "val": "val2017", "test": "test2017"}
    root = L.coco_standard(project.shapes / "scenes", tmp_path / "coco", names)
    store = tmp_path / "elsewhere"
    (root / "train2017").rename(store)
    (root / "train2017").mkdir()
    for p in store.iterdir():
        (root / "train2017" / p.name).symlink_to(p)
    options = {"annotations": "annotations/instances_{split}.json", "images": "{split}", "splits": names}
    _report("detection", det_params(project, **_data("detection", path=str(root), options=options)))


def test_one_coco_file_split_by_seed(project, tmp_path):
    """coco128-style: one annotation file and its image folder, no split on disk."""
    names = {"train": "train2017", "val": "val2017", "test": "test2017"}
    root = L.coco_standard(project.shapes / "scenes", tmp_path / "coco", names)
    options = {"annotations": "annotations/instances_{split}.json", "images": "{split}", "splits": {"train": "train2017"}}
    params = det_params(project, **_data("detection", path=str(root), options=options, split_from="seed"))
    report = _report("detection", params)
    images = get_task("detection", load_params(params).task("detection")).tables().images
    assert report["n_samples"] == len(images) == len(L.scenes_coco(project.shapes / "scenes", "train")["images"])
    assert set(images["split"]) == {"train", "val", "test"}
    with pytest.raises(validate.ValidationFailed, match="split_from: seed"):  # folders: the missing splits are named
        validate.run("detection", det_params(project, **_data("detection", path=str(root), options=options)))


# ------------------------------------------------------------------ YOLO
def test_yolo_detection_folders(project, tmp_path):
    root = tmp_path / "yolo"
    classes = L.yolo(project.shapes / "scenes", root)
    params = det_params(project, **_data("detection", format="yolo", path=str(root), classes=classes,
                                         options={"images": "images/{split}", "labels": "labels/{split}"}))
    report = _report("detection", params)
    task = get_task("detection", load_params(params).task("detection"))
    coco = get_task("detection", load_params(det_params(project)).task("detection")).tables().annotations
    yolo = task.tables().annotations
    assert len(yolo) == len(coco)
    key = ["x0", "y0", "x1", "y1"]  # the same boxes within rounding of the normalised text
    assert abs(yolo[key].to_numpy().sum() - coco[key].to_numpy().sum()) < 0.01 * len(coco)
    assert report["n_samples"] == 24


def test_yolo_data_yaml_orphans_and_missing_labels_are_reported(project, tmp_path):
    root = tmp_path / "yolo"
    split_names = {"train": "train2017", "val": "val2017", "test": "test2017"}
    classes = L.yolo(project.shapes / "scenes", root, names=split_names)
    (root / "data.yaml").write_text("path: .\ntrain: images/train2017\nval: images/val2017\ntest: images/test2017\n"
                                    "names:\n" + "".join(f"  {k}: {n}\n" for k, n in enumerate(classes)))
    unlabelled = sorted((root / "labels" / "train2017").iterdir())[0]
    unlabelled.unlink()
    (root / "labels" / "train2017" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    report = _report("detection", det_params(project, **_data("detection", format="yolo", path=str(root), classes=None,
                                                              options={"data_yaml": "data.yaml"})))
    notes = "\n".join(report["notes"])
    assert f"without a label file" in notes and unlabelled.stem in notes
    assert "ghost.txt" in notes and "without an image" in notes


def test_yolo_class_id_outside_names_fails_naming_the_file(project, tmp_path):
    root = tmp_path / "yolo"
    classes = L.yolo(project.shapes / "scenes", root)
    bad = sorted((root / "labels" / "val").iterdir())[1]
    bad.write_text("7 0.5 0.5 0.2 0.2\n")
    params = det_params(project, **_data("detection", format="yolo", path=str(root), classes=classes,
                                         options={"images": "images/{split}", "labels": "labels/{split}"}))
    with pytest.raises(validate.ValidationFailed, match=f"{bad}:1: class id 7 is not in the names list"):
        validate.run("detection", params)


def test_yolo_instance_segmentation_polygons(project, tmp_path):
    root = tmp_path / "yolo"
    classes = L.yolo(project.shapes / "scenes", root, polygons=True)
    params = project.params(**_data("instance_segmentation", format="yolo", path=str(root), classes=classes,
                                    options={"images": "images/{split}", "labels": "labels/{split}"}))
    _report("instance_segmentation", params)
    task = get_task("instance_segmentation", load_params(params).task("instance_segmentation"))
    image, target = task.dataset("train", None)[0]
    assert target["masks"].shape[0] == len(target["labels"]) > 0
    assert target["masks"].flatten(1).any(1).all()  # each polygon rasterised to a non-empty mask
    (root / "labels" / "train" / sorted(p.name for p in (root / "labels" / "train").iterdir())[0]).write_text(
        "0 0.5 0.5 0.2 0.2\n")  # a box line where a polygon is needed
    with pytest.raises(DataError, match="at least 3 points"):
        get_task("instance_segmentation", load_params(params).task("instance_segmentation"))._tables()
