"""data.format is a closed set, and each task reads its formats through the reader registry
(cv_models/data/registry.py): no format left without a reader, a format a task does not read named as such."""

from __future__ import annotations

from typing import get_args

import pytest

from cv_models import get_task
from cv_models.base import DataError
from cv_models.data.registry import READERS, formats, reader, register
from cv_models.settings import DataFormat
from tasks.config import ConfigError, load_params
from tests.conftest import REPO

TASKS = ("classification", "segmentation", "detection", "instance_segmentation")


def test_an_unknown_format_is_refused_with_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        load_params(REPO / "params.yaml", {"tasks.detection.data.format": "pascal_voc"})
    message = str(err.value)
    assert "detection.data.format" in message and "'pascal_voc'" in message
    assert all(f"'{fmt}'" in message for fmt in get_args(DataFormat))


def test_every_format_has_a_reader_and_every_task_reads_through_the_registry():
    for task in TASKS:
        get_task(task, load_params(REPO / "params.yaml").task(task))  # imports the task module and its readers
    assert set(READERS) == set(TASKS)
    assert {fmt for task in TASKS for fmt in formats(task)} == set(get_args(DataFormat))
    assert formats("detection") == ["coco", "voc", "yolo"]
    assert formats("instance_segmentation") == ["coco", "yolo", "instance_folders"]


def test_a_format_the_task_does_not_read_names_the_ones_it_does(tmp_path):
    params = load_params(
        REPO / "params.yaml", {"tasks.segmentation.data.format": "voc", "tasks.segmentation.data.path": str(tmp_path)}
    )
    task = get_task("segmentation", params.task("segmentation"))
    with pytest.raises(DataError, match=r"segmentation reads data.format \['coco', 'mask_folder'\], got 'voc'"):
        task.validation_tables()
    with pytest.raises(DataError, match="classification reads data.format"):
        reader("classification", "coco")


def test_a_reader_for_a_format_outside_the_closed_set_is_refused():
    with pytest.raises(ValueError, match="DataFormat"):
        register("detection", "labelme")
