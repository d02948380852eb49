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
    report = _report("detection", det_params(project, **_data("detection", path=str(root), options=options)))
    assert report["n_samples"] == 24  # every image read, the linked ones too
    linked = [n for n in report["notes"] if "outside the dataset folder" in n]
    assert linked and all("followed" in n and str(store) in n for n in linked), report["notes"]


def test_one_coco_file_split_by_seed(project, tmp_path):
    """coco128-style: one annotation file and its image folder, no split on disk."""
    names = {"train": "train2017", "val": "val2017", "test": "test2017"}
    root = L.coco_standard(project.shapes / "scenes", tmp_path / "coco", names)
    options = {
        "annotations": "annotations/instances_{split}.json",
        "images": "{split}",
        "splits": {"train": "train2017"},
    }
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
    params = det_params(
        project,
        **_data(
            "detection",
            format="yolo",
            path=str(root),
            classes=classes,
            options={"images": "images/{split}", "labels": "labels/{split}"},
        ),
    )
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
    (root / "data.yaml").write_text(
        "path: .\ntrain: images/train2017\nval: images/val2017\ntest: images/test2017\n"
        "names:\n" + "".join(f"  {k}: {n}\n" for k, n in enumerate(classes))
    )
    unlabelled = sorted((root / "labels" / "train2017").iterdir())[0]
    unlabelled.unlink()
    (root / "labels" / "train2017" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    report = _report(
        "detection",
        det_params(
            project,
            **_data("detection", format="yolo", path=str(root), classes=None, options={"data_yaml": "data.yaml"}),
        ),
    )
    notes = "\n".join(report["notes"])
    assert "without a label file" in notes and unlabelled.stem in notes
    assert "ghost.txt" in notes and "without an image" in notes


def test_yolo_class_id_outside_names_fails_naming_the_file(project, tmp_path):
    root = tmp_path / "yolo"
    classes = L.yolo(project.shapes / "scenes", root)
    bad = sorted((root / "labels" / "val").iterdir())[1]
    bad.write_text("7 0.5 0.5 0.2 0.2\n")
    params = det_params(
        project,
        **_data(
            "detection",
            format="yolo",
            path=str(root),
            classes=classes,
            options={"images": "images/{split}", "labels": "labels/{split}"},
        ),
    )
    with pytest.raises(validate.ValidationFailed, match=f"{bad}:1: class id 7 is not in the names list"):
        validate.run("detection", params)


def test_keep_classes_trains_box_tasks_on_some_classes_of_a_dataset(project, tmp_path):
    """COCO's person alone, say: the other classes' boxes are left out (not invalid), their images stay as
    background, class ids follow keep_classes, and a name the data lacks stops the run naming it."""
    root = tmp_path / "yolo"
    classes = L.yolo(project.shapes / "scenes", root, polygons=True)
    keep = [classes[2], classes[0]]
    opts = {"images": "images/{split}", "labels": "labels/{split}"}
    full = get_task(
        "detection",
        load_params(
            det_params(project, **_data("detection", format="yolo", path=str(root), classes=classes, options=opts))
        ).task("detection"),
    )
    params = det_params(
        project,
        **_data("detection", format="yolo", path=str(root), classes=classes, options={**opts, "keep_classes": keep}),
    )
    report = _report("detection", params)
    task = get_task("detection", load_params(params).task("detection"))
    assert task.class_names() == keep
    anns = task.tables().annotations
    assert set(anns["category"]) == set(keep) and len(anns) == full.tables().annotations["category"].isin(keep).sum()
    assert len(task.tables().images) == len(full.tables().images) == report["n_samples"]  # no image dropped
    assert any("keep_classes" in n and "left out" in n for n in report["notes"])
    labels = [
        int(label)
        for i in range(len(task.dataset("train", None)))
        for label in task.dataset("train", None)[i][1]["labels"]
    ]
    assert set(labels) <= {1, 2} and labels  # ids in keep_classes' order (0: the detectors' background)
    # instance segmentation reads it the same way
    inst = load_params(
        project.params(
            **_data(
                "instance_segmentation",
                format="yolo",
                path=str(root),
                classes=classes,
                options={**opts, "keep_classes": keep},
            )
        )
    )
    inst_task = get_task("instance_segmentation", inst.task("instance_segmentation"))
    assert inst_task.class_names() == keep and set(inst_task._tables()[1]["category"]) == set(keep)
    bad = det_params(
        project,
        **_data(
            "detection",
            format="yolo",
            path=str(root),
            classes=classes,
            options={**opts, "keep_classes": [classes[1][:-1] + "x"]},
        ),
    )
    with pytest.raises(
        (validate.ValidationFailed, DataError),
        match=rf"keep_classes: '{classes[1][:-1]}x' \(did you mean '{classes[1]}'\?\)",
    ):
        validate.run("detection", bad)


def test_yolo_instance_segmentation_polygons(project, tmp_path):
    root = tmp_path / "yolo"
    classes = L.yolo(project.shapes / "scenes", root, polygons=True)
    params = project.params(
        **_data(
            "instance_segmentation",
            format="yolo",
            path=str(root),
            classes=classes,
            options={"images": "images/{split}", "labels": "labels/{split}"},
        )
    )
    _report("instance_segmentation", params)
    task = get_task("instance_segmentation", load_params(params).task("instance_segmentation"))
    image, target = task.dataset("train", None)[0]
    assert target["masks"].shape[0] == len(target["labels"]) > 0
    assert target["masks"].flatten(1).any(1).all()  # each polygon rasterised to a non-empty mask
    (root / "labels" / "train" / sorted(p.name for p in (root / "labels" / "train").iterdir())[0]).write_text(
        "0 0.5 0.5 0.2 0.2\n"
    )  # a box line where a polygon is needed
    with pytest.raises(DataError, match="at least 3 points"):
        get_task("instance_segmentation", load_params(params).task("instance_segmentation"))._tables()


# ------------------------------------------------------------------ semantic segmentation
SEG_CLASSES = ["background", "circle", "square", "triangle", "star"]


def _seg(project, root, **options):
    return project.params(**_data("segmentation", path=str(root), classes=SEG_CLASSES, options=options))


def test_segnet_layout_with_an_unlabelled_index(project, tmp_path):
    """train/ + trainannot/ ..., class-index masks; index 11 is unlabelled and read as the ignore index."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "camvid"

    def with_void(mask):
        out = mask.copy()
        out[:2, :] = 11  # an unlabelled border, as CamVid's "void"
        return Image.fromarray(out, mode="L")

    L.copy_masks(
        project.shapes / "scenes",
        {s: root / s for s in L.SPLITS},
        {s: root / f"{s}annot" for s in L.SPLITS},
        convert=with_void,
    )
    params = _seg(project, root, images_dir="{split}", masks_dir="{split}annot", ignore_values=[11])
    _report("segmentation", params)
    task = get_task("segmentation", load_params(params).task("segmentation"))
    _, mask = task.dataset("train", None)[0]
    assert (np.asarray(mask)[:2] == 255).all() and np.asarray(mask)[2:].max() < len(SEG_CLASSES)
    with pytest.raises(validate.ValidationFailed, match=r"mask values in the declared classes.*trainannot"):
        validate.run("segmentation", _seg(project, root, images_dir="{split}", masks_dir="{split}annot"))


def test_masks_folder_set_to_the_images_is_named(project, tmp_path):
    """The SegNet layout with masks_dir left at the images: a clear message, not 'undeclared palette colours'."""
    root = tmp_path / "camvid"
    L.copy_masks(project.shapes / "scenes", {s: root / s for s in L.SPLITS}, {s: root / f"{s}annot" for s in L.SPLITS})
    with pytest.raises(validate.ValidationFailed, match="the images and masks folders are the same folder"):
        validate.run("segmentation", _seg(project, root, images_dir="{split}", masks_dir="{split}"))
    # masks_dir pointing at another folder of photos: the rule says what such files usually mean
    with pytest.raises(validate.ValidationFailed, match="masks_dir points at photos"):
        validate.run(
            "segmentation", _seg(project, root, images_dir="{split}annot", masks_dir="{split}", mask_suffix=".png")
        )


def test_pascal_voc_segmentation_layout(project, tmp_path):
    """JPEGImages/ + SegmentationClass/ palette PNGs + ImageSets/Segmentation/{split}.txt; 255 = boundary."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "voc"
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128] + [0] * (3 * 250) + [224, 224, 192]

    def to_palette(mask):
        out = mask.copy()
        out[-1, :] = 255  # VOC's object boundary / void colour
        im = Image.fromarray(out, mode="P")
        im.putpalette(palette)
        return im

    flat = {s: root / "JPEGImages" for s in L.SPLITS}
    L.copy_masks(project.shapes / "scenes", flat, {s: root / "SegmentationClass" for s in L.SPLITS}, convert=to_palette)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split in L.SPLITS:
        stems = sorted(p.stem for p in (project.shapes / "scenes" / "images" / split).iterdir())
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    params = _seg(
        project,
        root,
        images_dir="JPEGImages",
        masks_dir="SegmentationClass",
        palette_as_index=True,
        split_list="ImageSets/Segmentation/{split}.txt",
        image_suffix=".png",
    )
    report = _report("segmentation", params)
    assert report["n_samples"] == 24
    task = get_task("segmentation", load_params(params).task("segmentation"))
    assert {len(task.dataset(s, None)) for s in L.SPLITS} == {
        len(list((project.shapes / "scenes" / "images" / s).iterdir())) for s in L.SPLITS
    }
    _, mask = task.dataset("val", None)[0]
    assert (np.asarray(mask)[-1] == 255).all()


def test_ade20k_style_layout(project, tmp_path):
    """images/{split} + annotations/{split} with ADE's split names; 0 = 'other', not a class."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "ade"
    names = {"train": "training", "val": "validation", "test": "testing"}
    L.copy_masks(
        project.shapes / "scenes",
        {s: root / "images" / n for s, n in names.items()},
        {s: root / "annotations" / n for s, n in names.items()},
    )
    params = _seg(
        project, root, images_dir="images/{split}", masks_dir="annotations/{split}", splits=names, ignore_values=[0]
    )
    _report("segmentation", params)
    task = get_task("segmentation", load_params(params).task("segmentation"))
    val = task.dataset("val", None)
    assert len(val) == len(list((root / "images" / "validation").iterdir()))
    read = np.concatenate([np.asarray(val[i][1]).ravel() for i in range(len(val))])
    on_disk = np.concatenate(
        [np.asarray(Image.open(p)).ravel() for p in sorted((root / "annotations" / "validation").iterdir())]
    )
    assert 0 not in read and (read == 255).sum() == (on_disk == 0).sum() > 0  # "other" is the ignore index
    assert np.bincount(read[read != 255]).tolist() == np.bincount(on_disk[on_disk != 0]).tolist()  # the rest as it was


def test_per_instance_folders_layout(project, tmp_path):
    """<id>/images/<id>.png + <id>/masks/*.png (DSB 2018 nuclei), split by seed."""
    root = L.instance_folders(project.shapes / "scenes", tmp_path / "nuclei")
    params = project.params(
        **_data(
            "instance_segmentation",
            format="instance_folders",
            path=str(root),
            classes=None,
            split_from="seed",
            options={"class_name": "shape"},
        )
    )
    _report("instance_segmentation", params)


def test_symlink_saved_as_a_text_file_is_named(project, tmp_path):
    """A checkout without symlink support writes `images -> ../images` as a file holding '../images'."""
    root = tmp_path / "yolo"
    classes = L.yolo(project.shapes / "scenes", root / "store")
    (root / "det").mkdir()
    (root / "det" / "images").write_text("../store/images")
    params = det_params(
        project,
        **_data(
            "detection",
            format="yolo",
            path=str(root / "det"),
            classes=classes,
            options={"images": "images/{split}", "labels": "../store/labels/{split}"},
        ),
    )
    with pytest.raises(validate.ValidationFailed, match="a symlink saved as a plain file"):
        validate.run("detection", params)


# ------------------------------------------------------------------ defaults sized from the data
def test_detector_settings_sized_from_the_busiest_image(project):
    from cv_models.sizing import sized_values

    assert sized_values(260)["detections_per_img"] >= 260 and sized_values(260)["rpn_post_nms_top_n_test"] >= 520
    assert sized_values(3)["detections_per_img"] == 20  # small data keeps the CPU-friendly floor
    params = det_params(project)
    report = validate.run("detection", params)
    task = get_task("detection", load_params(params).task("detection"))
    most = task.most_objects()
    assert most == int(task.tables().images.query("split == 'train'")["n_boxes"].max())
    assert task.model_options().detections_per_img == sized_values(most)["detections_per_img"]
    sized = report["summaries"]["Settings sized from the data"]
    assert f"Largest number of objects in one training image: {most}" in sized and "detections_per_img" in sized


# ------------------------------------------------------------------ classification
def test_identical_images_under_two_classes(project):
    """trashnet150 files three photos under two classes each: a failing rule, or left out with drop."""
    import shutil

    train = project.classification / "train"
    classes = sorted(p.name for p in train.iterdir())
    victim = sorted((train / classes[0]).iterdir())[0]
    shutil.copy(victim, train / classes[1] / "copy_of_other_class.png")
    with pytest.raises(validate.ValidationFailed, match="no identical image filed under two different classes"):
        validate.run("classification", project.params())
    params = project.params(**{"tasks.classification.data.options": {"conflicting_duplicates": "drop"}})
    report = validate.run("classification", params)
    assert any("copy_of_other_class.png" in n and victim.name in n for n in report["notes"])
    task = get_task("classification", load_params(params).task("classification"))
    paths = [s["path"] for s in task._samples()[0]]
    assert str(victim) not in paths and not any("copy_of_other_class" in p for p in paths)
