"""Accelerator settings on the CPU: bf16 autocast trains and scores every task; the settings are
checked; fp32 with the defaults is the plain loop (bit for bit); the GPU benchmark's dry run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks import accelerate, augmented, baseline, evaluate, normstats
from tasks.config import ConfigError, load_params
from tests.conftest import REPO

# one epoch on tiny inputs: this checks that the bf16 path runs and scores, not how well it learns
TINY_TASKS = {
    "classification": {},
    "segmentation": {"tasks.segmentation.image_size": 32, "tasks.segmentation.model.width": 8},
    "detection": {"tasks.detection.image_size": 64, "tasks.detection.model.options.anchor_size": 12},
    "instance_segmentation": {"tasks.instance_segmentation.image_size": 64, "tasks.instance_segmentation.model.width": 8,
                              "tasks.instance_segmentation.model.options.anchor_size": 12,
                              "tasks.instance_segmentation.model.options.fpn_channels": 32},
}


def _tiny(task: str, **extra) -> dict:
    t = f"tasks.{task}."
    return {t + "train.epochs": 1, t + "train.batch_size": 4, t + "train.eval_batch_size": 8, t + "train.num_threads": 2,
            t + "overfit_check.enabled": False, t + "preview_samples": 4, t + "train.track_train_metric": False, **TINY_TASKS[task], **extra}


@pytest.mark.parametrize("task_name", list(TINY_TASKS))
def test_bf16_autocast_trains_and_scores_every_task_on_the_cpu(project, task_name):
    params = project.params(**_tiny(task_name, **{f"tasks.{task_name}.train.precision": "bf16"}))
    normstats.run(task_name, params)
    for stage in (baseline, augmented):
        m = stage.run(task_name, params)
        assert m["epochs_run"] == 1
    metrics = evaluate.run(task_name, params)
    primary = load_params(params).task(task_name)
    for name in ("baseline", "augmented"):
        scores = metrics[name]
        assert scores, name
        for k, v in scores.items():
            if isinstance(v, float) and k not in ("loss",):
                assert v == v, f"{name}.{k} is NaN under bf16"  # finite scores, not NaN
    assert Path(f"models/{task_name}/augmented/model.pt").exists()
    assert primary.train.precision == "bf16"


def test_bf16_autocast_really_runs_in_bf16():
    acc = accelerate.Accelerator(torch.device("cpu"), "bf16")
    layer = torch.nn.Linear(4, 2)
    with acc.autocast():
        assert layer(torch.randn(3, 4)).dtype == torch.bfloat16
    assert not acc.scaler.is_enabled()  # no loss scaling for bf16 (fp32's exponent range)
    assert accelerate.Accelerator(torch.device("cpu"), "fp16").scaler.is_enabled()


def test_channels_last_and_fp32_defaults_are_the_plain_loop(project):
    """The defaults change nothing; channels_last in fp32 gives the same training up to rounding."""
    def run(**extra):
        params = project.params(**_tiny("classification", **{"tasks.classification.train.epochs": 2, **extra}))
        normstats.run("classification", params)
        baseline.run("classification", params)
        return Path("outputs/classification/baseline/history.csv").read_text()

    import pandas as pd
    import io

    plain = pd.read_csv(io.StringIO(run()))
    nhwc = pd.read_csv(io.StringIO(run(**{"tasks.classification.train.channels_last": True})))
    assert nhwc["train_loss"].tolist() == pytest.approx(plain["train_loss"].tolist(), rel=1e-4)


@pytest.mark.parametrize("bad", [{"precision": "fp8"}, {"channels_last": "sometimes"}])
def test_bad_accelerator_settings_name_the_key(project, bad):
    key, value = next(iter(bad.items()))
    with pytest.raises(ConfigError, match=key):
        load_params(project.params(**{f"tasks.classification.train.{key}": value})).task("classification")


def test_gpu_benchmark_dry_run_prints_the_plan():
    out = subprocess.run([sys.executable, "benchmarks/gpu.py", "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resnet50" in out.stdout and "224" in out.stdout and "256" in out.stdout
    for word in ("classification", "segmentation", "detection", "fp32", "bf16", "fp16", "channels_last", "dvc repro"):
        assert word in out.stdout, word
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert plan["dry_run"] is True and len(plan["measurements"]) >= 9
