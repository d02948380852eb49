"""Detection data: the COCO and VOC readers, and bad input stopping the validate stage with the
file and the rule named (or reported without stopping, where the rule says so)."""

from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from cv_models import get_task
from tasks import validate
from tasks.config import load_params
from tests.detection_helpers import BCCD, BCCD_MISSING, annotation_file, coco_to_voc, det_params, edit_coco


def _fails(project, *rule_and_names, **params):
    with pytest.raises(validate.ValidationFailed) as err:
        validate.run("detection", det_params(project, **params))
    message = str(err.value)
    for text in rule_and_names:
        assert text in message, message
    return json.loads((project.root / "outputs/detection/validate/report.json").read_text())


def test_synthetic_scenes_pass_and_both_formats_give_the_same_table(project, tmp_path):
    report = validate.run("detection", det_params(project))
    assert report["success"] and report["n_samples"] == 24
    cfg = load_params(det_params(project)).task("detection")
    coco = get_task("detection", cfg).tables()
    voc_root = coco_to_voc(project.shapes / "scenes", tmp_path / "voc")
    voc_cfg = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(
                update={
                    "format": "voc",
                    "path": str(voc_root),
                    "classes": coco.categories,
                    "options": type(cfg.data.options)(images="JPEGImages", annotations="Annotations"),
                }
            )
        }
    )
    voc = get_task("detection", voc_cfg).tables()
    assert list(voc.images.columns) == list(coco.images.columns)
    assert list(voc.annotations.columns) == list(coco.annotations.columns)
    key = ["split", "category", "x0", "y0", "x1", "y1"]
    pd_coco = coco.annotations[key].sort_values(key).reset_index(drop=True)
    pd_voc = voc.annotations[key].sort_values(key).reset_index(drop=True)
    assert pd_coco.equals(pd_voc)


def test_box_outside_the_image_is_named(project):
    coco = edit_coco(project, lambda c: c["annotations"][0].update(bbox=[50, 50, 30, 10]))
    ann = coco["annotations"][0]
    name = next(i["file_name"] for i in coco["images"] if i["id"] == ann["image_id"])
    _fails(project, "box lies inside the image", f"annotations/train.json: annotation {ann['id']} on {name}")


def test_degenerate_box_is_named(project):
    coco = edit_coco(project, lambda c: c["annotations"][1].update(bbox=[10, 10, 0, 5]))
    _fails(project, "box has positive width and height", f"annotation {coco['annotations'][1]['id']} on")


def test_unknown_category_is_named(project):
    coco = edit_coco(project, lambda c: c["annotations"][2].update(category_id=99))
    _fails(
        project,
        "category is one of the known classes",
        f"annotations/train.json: annotation {coco['annotations'][2]['id']}",
    )


def test_annotation_of_an_unlisted_image_is_named(project):
    coco = edit_coco(project, lambda c: c["annotations"][0].update(image_id=9999))
    _fails(
        project,
        "every annotation's image is listed",
        f"annotation {coco['annotations'][0]['id']} on <image id 9999 not listed>",
    )


def test_missing_image_file_is_named(project):
    coco = json.loads(annotation_file(project).read_text())
    victim = coco["images"][0]
    (project.shapes / "scenes" / "images" / victim["file_name"]).unlink()
    _fails(project, "image file exists", f"image {victim['id']} ({victim['file_name']})")


@pytest.mark.parametrize("name", ["../../../outside.png", "/etc/hostname"])
def test_file_name_escaping_the_dataset_folder_is_named(project, name):
    edit_coco(project, lambda c: c["images"][0].update(file_name=name))
    _fails(project, "file name stays inside the dataset folder", f"({name})")


def test_malformed_json_is_named(project):
    annotation_file(project, "val").write_text('{"images": [')
    _fails(project, "annotations/val.json", "not valid JSON", "dataset readable")


def test_malformed_xml_is_named(project, tmp_path):
    voc = coco_to_voc(project.shapes / "scenes", tmp_path / "voc")
    victim = sorted((voc / "Annotations").glob("val_*.xml"))[0]
    victim.write_text("<annotation><object><name>circle</name>")
    _fails(
        project,
        str(victim),
        "not valid XML",
        **{
            "tasks.detection.data.format": "voc",
            "tasks.detection.data.path": str(voc),
            "tasks.detection.data.options": {"images": "JPEGImages", "annotations": "Annotations"},
        },
    )


def test_duplicate_image_id_is_named(project):
    coco = edit_coco(project, lambda c: c["images"][1].update(id=c["images"][0]["id"]))
    _fails(project, "image id unique within its split", f"image {coco['images'][0]['id']}")


def test_image_without_boxes_is_reported_not_fatal(project):
    coco = json.loads(annotation_file(project).read_text())
    empty = coco["images"][0]
    edit_coco(project, lambda c: c.update(annotations=[a for a in c["annotations"] if a["image_id"] != empty["id"]]))
    report = validate.run("detection", det_params(project))
    assert report["success"]
    assert any("1 image(s) without boxes" in n and empty["file_name"] in n for n in report["notes"]), report["notes"]
    md = (project.root / "outputs/detection/validate/report.md").read_text()
    assert "images without boxes" in md


def test_drop_policy_reports_and_drops_invalid_boxes(project):
    coco = edit_coco(project, lambda c: c["annotations"][1].update(bbox=[10, 10, 0, 5]))
    bad = coco["annotations"][1]
    params = det_params(project, **{"tasks.detection.data.options.invalid_boxes": "drop"})
    report = validate.run("detection", params)
    assert report["success"]
    assert any(f"annotation {bad['id']} on" in n and "box has positive width and height" in n for n in report["notes"])
    rule = next(r for r in report["checks"] if r["rule"] == "box has positive width and height")
    assert rule["success"] and rule["unexpected_count"] == 1
    task = get_task("detection", load_params(params).task("detection"))
    n_boxes = sum(len(r["boxes"]) for r in task.records("train"))
    assert n_boxes == len(coco["annotations"]) - 1


def test_coco_masks_decode_from_polygons_and_rle(project):
    from cv_models.data.coco import read_coco, decode_mask

    tables = read_coco(project.shapes / "scenes", with_masks=True)
    ann = tables.annotations
    kinds = {type(s).__name__ for s in ann["segmentation"]}
    assert kinds <= {"list", "dict"}
    for row in ann.head(12).itertuples():
        mask = decode_mask(row.segmentation, 64, 64)
        ys, xs = np.nonzero(mask)
        assert mask.shape == (64, 64) and len(xs)
        # the box is the mask's extent (within the pixels two polygon rasterisers disagree on)
        inside = (xs >= row.x0 - 1) & (xs < row.x1 + 1) & (ys >= row.y0 - 1) & (ys < row.y1 + 1)
        assert inside.mean() > 0.95 and abs(xs.min() - row.x0) <= 2.5 and abs(ys.max() + 1 - row.y1) <= 2.5


@pytest.mark.skipif(not BCCD.is_dir(), reason=BCCD_MISSING)
def test_bccd_zero_size_boxes_are_named_and_a_few_images_train(project, tmp_path):
    """Real VOC data, only params changed: a few BCCD images including the two with zero-size boxes."""
    from tasks import baseline, normstats

    lists = tmp_path / "lists"
    lists.mkdir()
    picks = {
        "train": ["BloodImage_00338", "BloodImage_00343", "BloodImage_00001", "BloodImage_00003"],
        "val": ["BloodImage_00004", "BloodImage_00005"],
        "test": ["BloodImage_00007", "BloodImage_00008"],
    }
    available = {p.stem for p in (BCCD / "Annotations").glob("*.xml")}
    for split, ids in picks.items():
        (lists / f"{split}.txt").write_text("\n".join(i for i in ids if i in available) + "\n")
    bccd = {
        "tasks.detection.data.format": "voc",
        "tasks.detection.data.path": str(BCCD),
        "tasks.detection.data.classes": ["RBC", "WBC", "Platelets"],
        "tasks.detection.data.options": {
            "annotations": "Annotations",
            "images": "JPEGImages",
            "split_files": str(lists / "{split}.txt"),
        },
        "tasks.detection.train.epochs": 1,
        "tasks.detection.overfit_check.enabled": False,
    }
    _fails(project, "box has positive width and height", "BloodImage_00338.xml", "BloodImage_00343.xml", **bccd)
    params = det_params(project, **{**bccd, "tasks.detection.data.options.invalid_boxes": "drop"})
    report = validate.run("detection", params)
    dropped = [n for n in report["notes"] if n.startswith("dropped")]
    assert (
        len(dropped) == 2
        and "BloodImage_00338.xml" in dropped[0] + dropped[1]
        and "BloodImage_00343.xml" in dropped[0] + dropped[1]
    )
    # the detector trains on the four images with every box but the two zero-size ones
    task = get_task("detection", load_params(params).task("detection"))
    records = task.records("train")
    in_xml = sum(
        len(ET.parse(BCCD / "Annotations" / f"{i}.xml").findall("object")) for i in picks["train"] if i in available
    )
    assert len(records) == len(picks["train"]) and sum(len(r["boxes"]) for r in records) == in_xml - 2
    normstats.run("detection", params)
    metrics = baseline.run("detection", params)
    assert metrics["epochs_run"] == 1 and 0 <= metrics["val_map50"] <= 1
    losses = pd.read_csv("outputs/detection/baseline/history.csv")["train_loss"]
    assert len(losses) == 1 and math.isfinite(losses[0]) and losses[0] > 0
    assert (project.root / "models/detection/baseline/model.pt").stat().st_size > 0
    shutil.rmtree(project.root / "models", ignore_errors=True)
