import pytest

from tasks.config import ConfigError, load_params
from tests.conftest import REPO, write_params


def test_repo_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert "classification" in params.tasks
    assert params.task("classification").train.epochs >= 1


def test_every_section_is_typed_down_to_the_tasks():
    """params.tasks[name] is the schema its CV task declares; ablation and search are their own schemas."""
    from cv_models import TASKS
    from tasks.runners.experiment_settings import AblationConfig, SearchConfig

    params = load_params(REPO / "params.yaml")
    for name, cfg in params.tasks.items():
        assert type(cfg) is TASKS[name].settings and params.task(name) is cfg
    assert isinstance(params.ablation, AblationConfig) and isinstance(params.search, SearchConfig)
    assert params.search.space["train.optimizer.lr"].log  # a nested model, not a dict
    assert params.tasks["detection"].model.options.fpn_channels >= 1


def test_problems_of_several_tasks_are_named_together(tmp_path):
    path = write_params(tmp_path, {"tasks.classification.train.epochs": 0, "tasks.segmentation.train.epoch": 3})
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert "tasks.classification.train.epochs: Input should be greater than or equal to 1" in str(err.value)
    assert "tasks.segmentation.train.epoch: unknown key; did you mean 'epochs'?" in str(err.value)


def test_empty_experiment_section_takes_its_defaults(tmp_path):
    params = load_params(write_params(tmp_path, {"ablation": None}))
    assert params.ablation.seeds == 3


def test_tasks_left_unread_say_so():
    params = load_params(REPO / "params.yaml", {"tasks.classification.train.epochs": 0}, check_tasks=False)
    assert params.tasks == {}
    with pytest.raises(ConfigError, match=r"tasks\.classification \(not read: load_params\(check_tasks=False\)\)"):
        params.task("classification")


def test_wrong_type_names_the_key(tmp_path):
    path = write_params(tmp_path, {"tasks.classification.train.epochs": "ten"})
    with pytest.raises(ConfigError, match=r"tasks\.classification\.train\.epochs"):
        load_params(path)


def test_out_of_range_names_the_key(tmp_path):
    path = write_params(tmp_path, {"tasks.classification.augment.hflip.p": 1.5})
    with pytest.raises(ConfigError, match=r"tasks\.classification\.augment\.hflip\.p.*less than or equal to 1"):
        load_params(path)


def test_unknown_key_is_rejected(tmp_path):
    path = write_params(tmp_path, {"tasks.classification.train.epoch": 3})
    with pytest.raises(ConfigError, match=r"tasks\.classification\.train\.epoch: unknown key; did you mean 'epochs'\?"):
        load_params(path)


@pytest.mark.parametrize(
    "key, value, suggestion",
    [
        ("tasks.detection.model.options.backbon", "resnet18", "backbone"),  # a task's own model options
        ("tasks.segmentation.data.options.mask_sufix", ".png", "mask_suffix"),  # a task's own reader options
        ("tasks.instance_segmentation.augment.options.min_are", 8, "min_area"),  # a task's own augment options
        ("tasks.detection.options.report_image", 2, "report_images"),  # task options
        ("tasks.segmentation.augment.cutout.mask_fil", "keep", "mask_fill"),  # a task's own augmentation settings
        ("tasks.detection.augment.mosaik", {"enabled": True}, "mosaic"),
        ("shapes.scenes.max_object", 3, "max_objects"),  # outside the tasks too
        ("seeed", 1, "seed"),
        ("ablation.runner.max_worker", 2, "max_workers"),  # the experiment sections are checked up front too
        ("search.pruner.startup_trial", 2, "startup_trials"),
    ],
)
def test_unknown_key_at_any_depth_is_named_with_a_suggestion(tmp_path, key, value, suggestion):
    path = write_params(tmp_path, {key: value})
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert f"{key}: unknown key; did you mean '{suggestion}'?" in str(err.value)


def test_a_setting_of_another_task_is_unknown_here(tmp_path):
    """mask_fill is segmentation's; detection's cutout has no such setting (it would do nothing)."""
    path = write_params(tmp_path, {"tasks.detection.augment.cutout.mask_fill": "keep"})
    with pytest.raises(ConfigError, match=r"tasks\.detection\.augment\.cutout\.mask_fill: unknown key"):
        load_params(path)


def test_reader_option_of_another_format_is_refused(tmp_path):
    path = write_params(tmp_path, {"tasks.detection.data.options.split_files": "ImageSets/{split}.txt"})
    with pytest.raises(ConfigError, match=r"tasks\.detection\.data.*\['split_files'\] are not read by format 'coco'"):
        load_params(path)


def test_unregistered_task_section_is_refused(tmp_path):
    path = write_params(tmp_path, {"tasks.detecton": {"data": {"path": "x"}}})
    with pytest.raises(ConfigError, match=r"tasks\.detecton: no CV task.*did you mean 'detection'"):
        load_params(path)


def test_defaults_live_in_the_schema():
    params = load_params(REPO / "params.yaml", {"tasks.detection.model.options": {}, "tasks.detection.options": {}})
    cfg = params.task("detection")
    assert cfg.model.options.rpn_batch_size_per_image == 64 and cfg.options.report_images == 16
    # issue 12: the proposal and detection counts are sized from the data unless set
    assert cfg.model.options.rpn_pre_nms_top_n_train == "auto" and cfg.model.options.detections_per_img == "auto"


def test_settings_schema_does_not_import_the_pipeline():
    """cv_models (and its schema) sit below tasks: importing them loads nothing from tasks/."""
    import subprocess
    import sys

    code = "import sys, cv_models; print(sorted(m for m in sys.modules if m == 'tasks' or m.startswith('tasks.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"


def test_bad_split_fractions(tmp_path):
    path = write_params(
        tmp_path, {"tasks.classification.data.split_fractions": {"train": 0.9, "val": 0.2, "test": 0.1}}
    )
    with pytest.raises(ConfigError, match="split_fractions"):
        load_params(path)


@pytest.mark.parametrize("task", ["classification", "segmentation", "detection", "instance_segmentation"])
def test_image_size_is_one_number_or_height_width(task):
    from cv_models.augment import build_transforms
    from PIL import Image

    cfg = load_params(REPO / "params.yaml", {f"tasks.{task}.image_size": [40, 56]}).task(task)
    assert cfg.image_size == (40, 56) and cfg.image_hw == (40, 56)
    assert build_transforms(cfg.image_size, None, None)(Image.new("RGB", (90, 60))).shape == (3, 40, 56)  # H x W
    assert load_params(REPO / "params.yaml", {f"tasks.{task}.image_size": 48}).task(task).image_hw == (48, 48)


@pytest.mark.parametrize("value", [[48], [48, 64, 3], [4, 64], [48, "wide"], "big", 0])
def test_bad_image_size_is_refused(value):
    with pytest.raises(ConfigError, match=r"tasks\.segmentation\.image_size"):
        load_params(REPO / "params.yaml", {"tasks.segmentation.image_size": value}).task("segmentation")


def test_overrides_apply_dotted_keys():
    params = load_params(REPO / "params.yaml", {"tasks.classification.train.epochs": 2, "seed": 7})
    assert params.seed == 7 and params.task("classification").train.epochs == 2


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")


def test_readme_presets_are_valid_augment_settings():
    """The docs' augment preset per kind of data (docs/data.md) must load as it is written."""
    import re

    import yaml

    from tasks.config import AugmentConfig

    text = (REPO / "docs" / "data.md").read_text()
    section = text.split("## Presets per kind of data", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (natural photos|street scenes|microscopy|documents)[^|]*\| `([^`]+)`", section, re.M)
    assert len(rows) == 4, rows
    for kind, block in rows:
        cfg = AugmentConfig.model_validate(yaml.safe_load(block))
        assert not (kind != "microscopy" and cfg.vflip.enabled), kind


# ---------------------------------------------------------------- issue 12's settings in the typed schema


def test_real_data_settings_are_typed_with_their_defaults():
    params = load_params(REPO / "params.yaml")
    assert params.task("classification").overfit_check.max_loss_ratio == 0.35
    assert params.task("classification").overfit_check.max_loss is None
    assert params.task("classification").data.options.conflicting_duplicates == "fail"
    seg = params.task("segmentation").data.options
    assert (
        seg.images_dir,
        seg.masks_dir,
        seg.splits,
        seg.split_list,
        seg.image_suffix,
        seg.value_map,
        seg.ignore_values,
        seg.palette_as_index,
    ) == ("images", "masks", None, None, ".jpg", None, [], False)
    for name in ("detection", "instance_segmentation"):
        o = params.task(name).model.options
        assert o.detections_per_img == "auto" and o.rpn_post_nms_top_n_test == "auto"


@pytest.mark.parametrize(
    "key, value, pattern",
    [
        (
            "tasks.classification.data.options.conflicting_duplicates",
            "keep",
            r"tasks\.classification\.data\.options\.conflicting_duplicates",
        ),
        ("tasks.segmentation.data.options.ignore_values", ["x"], r"tasks\.segmentation\.data\.options\.ignore_values"),
        ("tasks.segmentation.data.options.masks_dr", "label", r"masks_dr: unknown key; did you mean 'masks_dir'"),
        (
            "tasks.detection.model.options.detections_per_img",
            0,
            r"tasks\.detection\.model\.options\.detections_per_img",
        ),
        (
            "tasks.instance_segmentation.model.options.rpn_pre_nms_top_n_test",
            "many",
            r"tasks\.instance_segmentation\.model\.options\.rpn_pre_nms_top_n_test",
        ),
        (
            "tasks.classification.overfit_check.max_loss_ratio",
            1.5,
            r"tasks\.classification\.overfit_check\.max_loss_ratio",
        ),
    ],
)
def test_real_data_settings_name_the_key(tmp_path, key, value, pattern):
    path = write_params(tmp_path, {key: value})
    with pytest.raises(ConfigError, match=pattern):
        load_params(path)


def test_yolo_options_are_refused_for_coco(tmp_path):
    path = write_params(tmp_path, {"tasks.detection.data.options.labels": "labels/{split}"})
    with pytest.raises(ConfigError, match=r"\['labels'\] are not read by format 'coco'"):
        load_params(path)
    ok = write_params(
        tmp_path,
        {
            "tasks.detection.data.format": "yolo",
            "tasks.detection.data.options": {"images": "images/{split}", "labels": "labels/{split}"},
        },
    )
    assert load_params(ok).task("detection").data.options.labels == "labels/{split}"
