import hashlib

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from cv_models.data import shapes


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _cfg():
    return {
        "seed": 3,
        "image_size": 32,
        "classes": ["circle", "square", "triangle"],
        "splits": {"train": 0.5, "val": 0.25, "test": 0.25},
        "classification": {"num_images": 24},
        "scenes": {"num_images": 8, "image_size": 48, "max_objects": 3},
    }


def test_same_seed_gives_identical_files(tmp_path):
    shapes.generate(tmp_path / "a", _cfg())
    shapes.generate(tmp_path / "b", _cfg())
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    other = {**_cfg(), "seed": 4}
    shapes.generate(tmp_path / "c", other)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_formats(tmp_path):
    shapes.generate(tmp_path, _cfg())
    # ImageFolder: every class in every split
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (tmp_path / "classification" / split).iterdir()) == [
            "circle",
            "square",
            "triangle",
        ]
    # class-index masks: single channel, values within background + classes
    for mask_path in (tmp_path / "scenes" / "masks").rglob("*.png"):
        mask = Image.open(mask_path)
        assert mask.mode == "L"
        assert set(np.unique(np.asarray(mask))) <= {0, 1, 2, 3}
    # COCO: loads with pycocotools, masks decode to the image size, boxes enclose the masks
    coco = COCO(str(tmp_path / "scenes" / "annotations" / "train.json"))
    kinds = set()
    for ann in coco.dataset["annotations"]:
        img = coco.imgs[ann["image_id"]]
        m = coco.annToMask(ann)
        assert m.shape == (img["height"], img["width"]) and m.sum() > 0
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(m)
        assert xs.min() >= x - 1 and xs.max() <= x + w and ys.min() >= y - 1 and ys.max() <= y + h
        kinds.add("rle" if isinstance(ann["segmentation"], dict) else "polygon")
    assert "polygon" in kinds


def test_occluded_instances_use_rle():
    rng = np.random.default_rng(0)
    for _ in range(50):
        _, instances = shapes.render_scene(rng, 48, ["circle", "square"], 4, (0.3, 0.5))
        occluded = [i for i in instances if i.occluded]
        if occluded:
            rle = shapes.mask_to_rle(occluded[0].mask)
            assert (mask_utils.decode({**rle, "counts": rle["counts"].encode()}) == occluded[0].mask).all()
            return
    raise AssertionError("no occlusion in 50 scenes of 4 large shapes")
