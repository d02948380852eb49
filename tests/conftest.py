"""Shared fixtures: tiny synthetic data, a throw-away project folder, a per-session MLflow store."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Small enough for a 2-core CPU, big enough that a model clearly beats the dummy score.
TINY = {
    "shapes.image_size": 32,
    "shapes.classification": {"num_images": 480, "scale": [0.5, 0.9], "clutter": 0, "noise": 4},
    "shapes.scenes": {"num_images": 24, "image_size": 64, "min_objects": 1, "max_objects": 3, "scale": [0.2, 0.45]},
    "shapes.classes": ["circle", "square", "triangle", "star"],
    "tasks.classification.image_size": 32,
    "tasks.classification.train.epochs": 6,
    "tasks.classification.train.batch_size": 16,
    "tasks.classification.train.num_threads": 1,
    "tasks.classification.preview_samples": 8,
    "tasks.classification.overfit_check.steps": 40,
    # fewer than the defaults (24, 22: sized for 210 training scenes); the tests' 17 scenes need no more
    "tasks.detection.train.epochs": 14,
    "tasks.instance_segmentation.train.epochs": 14,
    "pretrain.epochs": 1,
    "pretrain.batch_size": 64,
}


class FitHooksStub:
    """For the tests' duck-typed tasks: what engine.fit calls on a CVTask beyond the step and the score, the
    pretrained-encoder hooks, as a task without a pretrained encoder has them (nothing frozen, one learning rate)."""

    lr_factor = None

    def before_epoch(self, model, epoch: int) -> None:
        return None


def tiny_overrides(**extra) -> dict:
    # a deep copy: applying an override such as shapes.scenes.num_imgs writes into the nested dicts it is given
    return copy.deepcopy({**TINY, **extra})


# one epoch on tiny inputs: enough to check that a path runs and scores, not how well it learns
TINY_TASKS = {
    "classification": {},
    "segmentation": {"tasks.segmentation.image_size": 32, "tasks.segmentation.model.width": 8},
    "detection": {"tasks.detection.image_size": 64, "tasks.detection.model.options.anchor_size": 12},
    "instance_segmentation": {
        "tasks.instance_segmentation.image_size": 64,
        "tasks.instance_segmentation.model.width": 8,
        "tasks.instance_segmentation.model.options.anchor_size": 12,
        "tasks.instance_segmentation.model.options.fpn_channels": 32,
    },
}


def tiny_task(task: str, **extra) -> dict:
    """One task's settings for one epoch on tiny inputs (tests/test_accelerate.py, tests/test_gpu.py)."""
    t = f"tasks.{task}."
    return {
        t + "train.epochs": 1,
        t + "train.batch_size": 4,
        t + "train.eval_batch_size": 8,
        t + "train.num_threads": 1,
        t + "overfit_check.enabled": False,
        t + "preview_samples": 4,
        t + "train.track_train_metric": False,
        **TINY_TASKS[task],
        **extra,
    }


def write_params(folder: Path, overrides: dict) -> Path:
    from tasks.config import load_raw

    raw = load_raw(REPO / "params.yaml", overrides)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """No test writes into the repo's MLflow store, Prefect home or torch cache."""
    base = tmp_path_factory.mktemp("env")
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    os.environ["DVC_NO_ANALYTICS"] = "1"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{base / 'mlflow.db'}"
    os.environ["CV_MLFLOW_ARTIFACT_ROOT"] = str(base / "mlartifacts")
    os.environ["PREFECT_HOME"] = str(base / "prefect")
    # the in-process flows start Prefect's ephemeral server; on a busy 2-core machine 20 s (the default) is too short,
    # and on a loaded AMD EPYC 120 s was too (three test_ablation.py fixtures timed out)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ["TORCH_HOME"] = str(base / "torch")
    os.environ["CV_PIPELINE_RUN_ID"] = "pytest"
    import torch

    torch.set_num_threads(1)  # one per pytest-xdist worker: a second OpenMP thread on shared cores spin-waits
    yield


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """The synthetic data generated once with the tiny settings (copy it before changing it)."""
    from cv_models.data import shapes
    from tasks.config import load_params

    folder = tmp_path_factory.mktemp("shapes")
    params = load_params(REPO / "params.yaml", TINY)
    shapes.generate(folder, params.shapes)
    return folder


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_shapes):
    """A working folder holding a copy of the tiny data and a params.yaml pointing at it."""
    data = tmp_path / "data" / "shapes"
    shutil.copytree(tiny_shapes, data)
    monkeypatch.chdir(tmp_path)

    class Project:
        root = tmp_path
        shapes = data
        classification = data / "classification"

        @staticmethod
        def params(**extra) -> Path:
            return write_params(tmp_path, tiny_overrides(**extra))

    return Project


# The slowest modules first (measured: `make test` prints the slowest durations; per module at 262c016 on a 2-core
# AMD EPYC, in seconds: 289 169 154 141 136 108 101 88 86 79 77 66 65 52 33 31). Under `--dist loadfile` each module
# runs whole on one worker; each worker takes the next module in this order when it is free, so longest first
# evens out the two workers' ends. `--no-loadscope-reorder` (pyproject.toml) keeps this order: by default
# pytest-xdist (3.5+) reorders modules by their number of tests, which put the few-test e2e modules last.
SLOWEST_MODULES_FIRST = [
    "test_e2e_detection.py",
    "test_e2e_instance_segmentation.py",
    "test_e2e_classification.py",
    "test_use_model.py",
    "test_e2e_segmentation.py",
    "test_prefect_workers.py",
    "test_team_setup.py",
    "test_real_datasets.py",
    "test_ablation.py",
    "test_interruption.py",
    "test_distributed.py",
    "test_bad_input.py",
    "test_mlflow_view.py",
    "test_chain.py",
    "test_init.py",
    "test_segmentation.py",
    "test_layouts.py",
]


def prefect_harness():
    """Prefect's test harness (a temporary server and database) with the start-up limit the suite uses: its own
    default, 30 s, timed out three tests/test_ablation.py fixtures on a loaded 2-core AMD EPYC."""
    from prefect.testing.utilities import prefect_test_harness

    return prefect_test_harness(
        server_startup_timeout=int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
    )


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
