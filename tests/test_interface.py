"""The task interface is complete (cv_models/base.py): what a task may do is a method of CVTask, so the stages
and the benchmarks call it without asking a task's name or probing it with getattr."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from cv_models import TASKS
from cv_models.base import CVTask
from tasks.config import load_params
from tasks.use.inference import Loaded
from tasks.use.predict import predict_files
from tests.conftest import REPO, tiny_overrides, tiny_task, write_params

TASK_PACKAGES = {REPO / "cv_models" / name for name in TASKS}  # a task may name itself inside its own package
NAME_BRANCH = re.compile(
    r"""(==|!=)\s*["'](%s)["']|\btask(\.name|_name)\s*(==|!=)|(get|has)attr\((st\.)?task\b""" % "|".join(TASKS)
)


def test_every_capability_is_a_method_of_the_interface():
    assert "predict_image" in CVTask.__abstractmethods__  # every task has it: no NotImplementedError default
    for name in ("validation_summaries", "sample_labels", "counted_classes", "result_rows", "write_results"):
        assert callable(getattr(CVTask, name)), name


def test_no_branch_on_a_task_name_outside_its_module():
    hits = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for folder in ("tasks", "flows", "benchmarks", "cv_models")
        for path in sorted((REPO / folder).rglob("*.py"))
        if path.parent not in TASK_PACKAGES
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if NAME_BRANCH.search(line)
    ]
    assert hits == []


@pytest.mark.parametrize(
    "task_name, results, counted, header",
    [
        ("classification", "predictions.csv", ["circle", "square", "triangle", "star"], "| class | images |"),
        (
            "segmentation",
            "predictions.csv",
            ["circle", "square", "triangle", "star"],
            "| class | images containing the class |",
        ),
    ],
)
def test_predict_writes_what_the_task_declares(tmp_path, task_name, results, counted, header):
    """An untrained model on two images: the results file with the input file first, the classes the task counts
    (segmentation leaves the background out) and the summary's words for what is counted."""
    params = load_params(write_params(tmp_path, tiny_overrides(**tiny_task(task_name))))
    cfg = params.task(task_name)
    names = ["background", *counted] if task_name == "segmentation" else counted
    task = TASKS[task_name](cfg.model_copy(update={"data": cfg.data.model_copy(update={"classes": names})}))
    torch.manual_seed(0)
    files = []
    for k in range(2):
        files.append(tmp_path / f"img{k}.png")
        Image.new("RGB", (40, 30), (40 * k, 90, 200)).save(files[-1])
    summary = predict_files(Loaded(task, task.build_model().eval(), None, "untrained", {}), files, tmp_path / "out")
    assert summary["results"] == results and list(summary["objects_per_class"]) == counted
    rows = (tmp_path / "out" / results).read_text().splitlines()
    assert rows[0].startswith("file,image_id,") and rows[1].startswith(f"{files[0]},1,") and len(rows) == 3
    assert header in (tmp_path / "out" / "summary.md").read_text()
    assert (
        json.loads((tmp_path / "out" / "summary.json").read_text())["objects_per_class"] == summary["objects_per_class"]
    )
