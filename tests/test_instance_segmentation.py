"""Instance segmentation: bad masks stop validation naming the file and the rule; the mixers keep
masks and boxes together; the reported mask mAP is pycocotools' figure on the exported predictions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks import validate
from tasks.validate import ValidationFailed

TASK = "instance_segmentation"
# tiny everything: 64 px scenes, a tiny backbone, few proposals
TINY_INST = {
    "tasks.instance_segmentation.image_size": 64,
    "tasks.instance_segmentation.model.width": 8,
    "tasks.instance_segmentation.model.options.fpn_channels": 32,
    "tasks.instance_segmentation.model.options.anchor_size": 8,
    "tasks.instance_segmentation.train.num_threads": 1,
    "tasks.instance_segmentation.preview_samples": 4,
    "tasks.instance_segmentation.options.report_images": 2,
}


def params(project, **extra):
    return project.params(**{**TINY_INST, **extra})


def _coco(project, split="train") -> tuple[Path, dict]:
    path = project.shapes / "scenes" / "annotations" / f"{split}.json"
    return path, json.loads(path.read_text())


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _report() -> dict:
    return json.loads(Path(f"outputs/{TASK}/validate/report.json").read_text())


def _failing(report: dict, rule_part: str) -> list[str]:
    return [f for r in report["checks"] if rule_part in r["rule"] and not r["success"] for f in r["failing"]]


# ------------------------------------------------------------ COCO: one run, every breakage in its own annotation
BREAKAGES = {  # annotation index in train.json -> (how it is broken, rule named in the report)
    "empty mask": (0, "mask has a non-empty area"),
    "mask of the wrong size": (1, "mask has the image's size"),
    "broken polygon": (2, "polygons have at least 3 points"),
    "RLE that does not decode": (3, "every mask decodes"),
    "RLE counts not adding up": (4, "RLE counts add up to the image size"),
    "box far from the mask": (5, "box matches the mask's extent"),
    "unknown category": (6, "category is one of the known classes"),
}


@pytest.fixture
def broken_coco(project):
    path, coco = _coco(project)
    anns = coco["annotations"]
    size = coco["images"][0]["height"], coco["images"][0]["width"]
    anns[0]["segmentation"] = _rle(np.zeros(size, dtype=bool))
    anns[1]["segmentation"] = _rle(np.ones((size[0] // 2, size[1] // 2), dtype=bool))
    anns[2]["segmentation"] = [[3.0, 4.0, 10.0, 12.0]]  # two points
    anns[3]["segmentation"] = {"size": list(size), "counts": "\x01\x02not rle"}
    anns[4]["segmentation"] = {"size": list(size), "counts": [10, 20, 30]}
    anns[5]["bbox"] = [0, 0, 5, 5]
    anns[6]["category_id"] = 99
    path.write_text(json.dumps(coco))
    names = {img["id"]: img["file_name"] for img in coco["images"]}
    items = {
        k: f"annotations/train.json: annotation {anns[i]['id']} on {names[anns[i]['image_id']]}"
        for k, (i, _) in BREAKAGES.items()
    }
    with pytest.raises(ValidationFailed) as err:
        validate.run(TASK, params(project))
    return str(err.value), _report(), items


def test_clean_synthetic_scenes_pass(project):
    report = validate.run(TASK, params(project))
    assert report["success"] and report["n_samples"] == 24
    kinds = report["summaries"]["Instances per class"]
    assert "polygon" in kinds and "rle" in kinds  # both encodings are read


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_bad_coco_mask_is_named_with_its_rule(broken_coco, case):
    message, report, items = broken_coco
    rule = BREAKAGES[case][1]
    assert items[case] in _failing(report, rule), (case, _failing(report, rule))
    assert rule in message and "annotations/train.json" in message
    assert not Path(f"outputs/{TASK}/normstats").exists()  # nothing after a failed validation


def test_file_name_outside_the_dataset_folder(project):
    path, coco = _coco(project, "val")
    coco["images"][0]["file_name"] = "../../../etc/passwd"
    path.write_text(json.dumps(coco))
    with pytest.raises(ValidationFailed, match="file name stays inside the dataset folder"):
        validate.run(TASK, params(project))
    assert any("etc/passwd" in f for f in _failing(_report(), "stays inside"))


# ------------------------------------------------------------ per-instance PNG folders (microscopy layout)
def coco_to_instance_folders(scenes: Path, out: Path) -> Path:
    """Write the COCO scenes in the ``<split>/<id>/images/<id>.png + masks/*.png`` layout."""
    from pycocotools import mask as mask_utils

    for split in ("train", "val", "test"):
        coco = json.loads((scenes / "annotations" / f"{split}.json").read_text())
        for img in coco["images"]:
            stem = Path(img["file_name"]).stem
            folder = out / split / stem
            (folder / "images").mkdir(parents=True)
            (folder / "masks").mkdir()
            shutil.copy(scenes / "images" / img["file_name"], folder / "images" / f"{stem}.png")
            for a in (a for a in coco["annotations"] if a["image_id"] == img["id"]):
                seg = a["segmentation"]
                h, w = img["height"], img["width"]
                rle = (
                    mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
                    if isinstance(seg, list)
                    else {"size": seg["size"], "counts": seg["counts"].encode()}
                )
                mask = mask_utils.decode(rle).astype(np.uint8) * 255
                Image.fromarray(mask).save(folder / "masks" / f"{a['id']}.png")
    return out


@pytest.fixture
def folders(project):
    root = coco_to_instance_folders(project.shapes / "scenes", project.root / "cells")
    return root, {
        "tasks.instance_segmentation.data.format": "instance_folders",
        "tasks.instance_segmentation.data.path": "cells",
        "tasks.instance_segmentation.data.options": {"class_name": "cell"},
    }


def test_instance_folders_pass_and_read(project, folders):
    from cv_models import get_task
    from tasks.config import load_params

    root, extra = folders
    report = validate.run(TASK, params(project, **extra))
    assert report["success"] and report["n_samples"] == 24
    cfg = load_params(params(project, **extra)).task(TASK)
    task = get_task(TASK, cfg)
    assert task.class_names() == ["cell"]
    image, target = task.dataset("train", task.eval_transforms(None))[0]
    n_pngs = len(list((root / "train" / "00000" / "masks").glob("*.png")))
    assert image.shape == (3, 64, 64) and target["masks"].shape == (n_pngs, 64, 64)
    assert (target["labels"] == 1).all()


def test_instance_png_that_is_not_binary(project, folders):
    root, extra = folders
    victim = sorted((root / "val").glob("*/masks/*.png"))[0]
    mask = np.asarray(Image.open(victim)).copy()
    mask[mask > 0] = np.random.default_rng(0).integers(1, 255, size=int((mask > 0).sum()))
    Image.fromarray(mask).save(victim)
    with pytest.raises(ValidationFailed, match=rf"instance PNG is binary.*{victim.name}"):
        validate.run(TASK, params(project, **extra))
    assert any(f.endswith(f"{victim.parent.parent.name}/masks/{victim.name}") for f in _failing(_report(), "binary"))


def test_instance_png_of_the_wrong_size(project, folders):
    root, extra = folders
    victim = sorted((root / "train").glob("*/masks/*.png"))[1]
    Image.open(victim).resize((32, 32)).save(victim)
    with pytest.raises(ValidationFailed, match="mask has the image's size"):
        validate.run(TASK, params(project, **extra))
    assert any(f.endswith(victim.name) for f in _failing(_report(), "image's size"))


# ------------------------------------------------------------ augmentations
def _square_target(h=32, w=32, boxes=((2, 2, 12, 12),), label=1):
    masks = torch.zeros((len(boxes), h, w), dtype=torch.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        masks[k, y0:y1, x0:x1] = 1
    from cv_models.mix.instances import boxes_from_masks

    return {"masks": masks, "boxes": boxes_from_masks(masks), "labels": torch.full((len(boxes),), label), "image_id": 1}


def test_copy_paste_brings_mask_and_box_and_removes_hidden_instances():
    from cv_models.mix.instances import copy_paste

    a = _square_target(boxes=((2, 2, 12, 12), (20, 20, 30, 30)), label=1)
    b = _square_target(boxes=((0, 0, 32, 14),), label=2)  # covers a's first instance entirely (mirrored or not)
    img_a, img_b = torch.zeros(3, 32, 32), torch.ones(3, 32, 32)
    image, t = copy_paste(img_a, a, img_b, b, 1.0, min_area=4, min_visible=0.25, gen=torch.Generator().manual_seed(1))
    assert t["labels"].tolist() == [1, 2]  # a's hidden square removed, b's square pasted
    assert t["masks"].shape == (2, 32, 32)
    assert t["boxes"].tolist() == [[20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 32.0, 14.0]]
    pasted = t["masks"][1].bool()
    assert (image[:, pasted] == 1).all() and (image[:, ~t["masks"].any(0).bool()] == 0).all()


def test_cutmix_and_mixup_keep_boxes_equal_to_mask_extents():
    from cv_models.mix.instances import InstanceBatchMixer, MixOp, boxes_from_masks

    gen = torch.Generator().manual_seed(0)
    targets = [
        _square_target(boxes=((2, 2, 20, 20), (22, 5, 30, 28))),
        _square_target(boxes=((5, 5, 25, 25),), label=3),
    ]
    images = torch.rand(2, 3, 32, 32)
    for op in ("cutmix", "mixup", "copy_paste"):
        mixer = InstanceBatchMixer([MixOp(op, 1.0, 1.0)], min_area=4, min_visible=0.2, generator=gen)
        out_images, out = mixer(images, targets)
        assert out_images.shape == images.shape
        for t in out:
            assert len(t["masks"]) == len(t["boxes"]) == len(t["labels"])
            assert torch.equal(t["boxes"], boxes_from_masks(t["masks"]))
            assert (t["masks"].flatten(1).sum(1) >= 4).all()


def test_train_transforms_move_masks_with_the_image(project):
    from cv_models import get_task
    from tasks.config import load_params

    cfg = load_params(
        params(
            project,
            **{
                "tasks.instance_segmentation.augment.rotation.enabled": True,
                "tasks.instance_segmentation.augment.crop.enabled": True,
                "tasks.instance_segmentation.augment.cutout.enabled": True,
                "tasks.instance_segmentation.augment.cutout.p": 1.0,
            },
        )
    ).task(TASK)
    task = get_task(TASK, cfg)
    data = task.dataset("train", task.train_transforms(cfg.augment, None))
    for i in range(6):
        image, t = data[i]
        assert image.shape == (3, 64, 64) and t["masks"].shape[1:] == (64, 64)
        assert len(t["masks"]) == len(t["boxes"]) == len(t["labels"])
        if len(t["masks"]):
            assert (t["masks"].flatten(1).sum(1) >= 16).all()
    picture = task.draw(image, t)
    assert picture.dtype == torch.uint8 and picture.shape == (3, 192, 192)  # enlarged for legibility


# ------------------------------------------------------------ metrics
def test_reported_mask_map_is_pycocotools_on_the_exported_predictions(project, tmp_path):
    """Score partly right predictions, export them as the evaluate stage does, recompute independently."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from cv_models import get_task
    from tasks.config import load_params

    cfg = load_params(params(project)).task(TASK)
    task = get_task(TASK, cfg)
    test = task.dataset("test", task.eval_transforms(None))
    dummy = task.dummy_result(task.dataset("train", None), test)
    gt = dummy.extra["coco_gt"]
    # an oracle right on every other instance, with one shifted mask: mAP strictly between 0 and 1
    results = []
    for k, a in enumerate(gt["annotations"]):
        if k % 2 == 0:
            results.append(
                {**{f: a[f] for f in ("image_id", "category_id", "bbox", "segmentation")}, "score": 0.9 - k * 1e-3}
            )
    shifted = dict(results[0], category_id=results[0]["category_id"] % 4 + 1, score=0.95)
    results.append(shifted)
    oracle = task._result(gt, results)
    files = task.report({"dummy": dummy, "oracle": oracle}, test, tmp_path)
    assert (tmp_path / "predictions_test.png").exists() and (tmp_path / "RECOMPUTE.md").exists() and len(files) == 5
    for name, res in (("dummy", dummy), ("oracle", oracle)):
        coco_gt = COCO(str(tmp_path / "coco_ground_truth.json"))
        coco_dt = coco_gt.loadRes(str(tmp_path / f"coco_results_{name}.json"))
        for iou_type, prefix in (("segm", "mask"), ("bbox", "box")):
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.evaluate(), ev.accumulate(), ev.summarize()
            assert res.metrics[f"{prefix}_map"] == pytest.approx(max(ev.stats[0], 0))
            assert res.metrics[f"{prefix}_map50"] == pytest.approx(max(ev.stats[1], 0))
    assert 0.3 < oracle.metrics["mask_map50"] < 1.0 and dummy.metrics["mask_map50"] < oracle.metrics["mask_map50"]
