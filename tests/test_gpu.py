"""On a CUDA GPU: every task's stages train and score there with the fast settings (bf16 autocast and
channels_last), fp16 with its loss scaling learns, fp32 with ``train.deterministic`` reruns bit for
bit, and a model trained on the GPU predicts on a machine without one.

Skipped where torch sees no CUDA device (CI has none): run ``python -m pytest tests/test_gpu.py`` on a
GPU machine. ``CV_TEST_DEVICE=cpu`` runs the same tests on the CPU, to check them without a GPU."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tasks import augmented, baseline, normstats
from tasks.config import load_params
from tests.conftest import TINY_TASKS, tiny_task
from tests.layer_probe import channels_last_convs, dtypes, layer_outputs

DEVICE = os.environ.get("CV_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(),
    reason="needs a CUDA GPU (torch sees none here): run it on a GPU machine",
)


def _on_device(task: str, **extra) -> dict:
    return tiny_task(task, **{f"tasks.{task}.train.device": DEVICE, **extra})


def _metrics(task: str, stage: str) -> dict:
    return json.loads(Path(f"outputs/{task}/{stage}/metrics.json").read_text())


def _task(task_name: str, params: Path):
    from cv_models import get_task

    return get_task(task_name, load_params(params).task(task_name))


def _test_files(task_name: str, params: Path) -> list[Path]:
    data = _task(task_name, params).dataset("test", None)
    rows = getattr(data, "samples", None) or data.records
    return [Path(rows[i]["path"]) for i in range(min(3, len(data)))]


@pytest.mark.parametrize("task_name", list(TINY_TASKS))
def test_every_task_trains_on_the_gpu_in_bf16_channels_last_and_predicts_on_a_cpu(project, task_name, tmp_path):
    from tasks.use.inference import load_checkpoint
    from tasks.use.predict import predict_files

    t = f"tasks.{task_name}."
    params = project.params(
        **_on_device(
            task_name, **{t + "train.epochs": 2, t + "train.precision": "bf16", t + "train.channels_last": True}
        )
    )
    normstats.run(task_name, params)
    if DEVICE.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with layer_outputs() as seen:
        result = augmented.run(task_name, params)
    assert result["epochs_run"] == 2
    assert torch.bfloat16 in dtypes(seen), seen  # the settings were not ignored: bf16 convolutions,
    assert channels_last_convs(seen) > 0, seen  # laid out channels-last
    if DEVICE.startswith("cuda"):
        assert torch.cuda.max_memory_allocated() > 0  # the training ran on the GPU
    value = _metrics(task_name, "augmented")[f"val_{_task(task_name, params).primary_metric}"]
    assert 0 <= value <= 1 and not math.isnan(value)

    # the checkpoint holds CPU tensors once loaded: it predicts where no GPU is
    loaded = load_checkpoint(task_name, Path(f"models/{task_name}/augmented/model.pt"))
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    summary = predict_files(loaded, _test_files(task_name, params), tmp_path / "pred")
    assert summary["images"] == 3 and not summary["failures"], summary


def test_fp16_with_loss_scaling_learns_classification(project):
    """fp16 autocast with its GradScaler, channels_last: the baseline stage (overfit-one-batch check on)
    ends above the dummy solution by the margin fp32 reaches (0.44 against 0.25 on a CPU; fp16 0.47)."""
    t = "tasks.classification."
    params = project.params(
        **_on_device(
            "classification",
            **{
                t + "train.epochs": 15,
                t + "train.batch_size": 16,
                t + "train.precision": "fp16",
                t + "train.channels_last": True,
                t + "overfit_check.enabled": True,
            },
        )
    )
    normstats.run("classification", params)
    baseline.run("classification", params)
    m = _metrics("classification", "baseline")
    assert m["val_accuracy"] > m["dummy_val_accuracy"] + 0.15, m


def test_fp32_deterministic_reruns_bit_for_bit(project):
    """train.deterministic: true (deterministic kernels, no cuDNN autotuning; auto turns them off on a GPU) and the
    same seed: a rerun on the GPU, trained afresh (resume off), gives the same history and the same weights."""
    t = "tasks.classification.train."
    params = project.params(
        **_on_device("classification", **{t + "epochs": 2, t + "deterministic": True, t + "resume": False})
    )
    normstats.run("classification", params)
    runs = []
    for _ in range(2):
        baseline.run("classification", params)
        weights = torch.load("models/classification/baseline/model.pt", map_location="cpu", weights_only=True)["model"]
        runs.append((Path("outputs/classification/baseline/history.csv").read_text(), weights))
    (history_a, weights_a), (history_b, weights_b) = runs
    assert history_a == history_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
