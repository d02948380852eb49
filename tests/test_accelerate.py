"""Accelerator settings on the CPU: bf16 autocast trains and scores every task; the settings are
checked; fp32 with the defaults is the plain loop (bit for bit); the GPU benchmark's dry run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks import augmented, baseline, evaluate, normstats
from tasks.config import ConfigError, load_params
from tasks.training import accelerate
from tests.conftest import REPO, TINY_TASKS, tiny_task
from tests.layer_probe import dtypes, layer_outputs


def test_bf16_stages_train_and_evaluate_classification(project):
    """The stages under train.precision: bf16, evaluate included (it scores under the same autocast)."""
    params = project.params(**tiny_task("classification", **{"tasks.classification.train.precision": "bf16"}))
    for folder in project.classification.glob("*/*"):  # 6 images per class and split: bf16 convs are slow on most CPUs
        for extra in sorted(folder.iterdir())[6:]:
            extra.unlink()
    normstats.run("classification", params)
    for stage in (baseline, augmented):
        with layer_outputs() as seen:
            assert stage.run("classification", params)["epochs_run"] == 1
        assert torch.bfloat16 in dtypes(seen), (stage.__name__, seen)  # the training really ran under bf16 autocast
    with layer_outputs() as seen:
        metrics = evaluate.run("classification", params)
    assert torch.bfloat16 in dtypes(seen), seen  # and so did the scoring
    for name in ("baseline", "augmented"):
        assert 0 <= metrics[name]["accuracy"] <= 1 and metrics[name]["loss"] == metrics[name]["loss"]  # not NaN


@pytest.mark.parametrize("task_name", list(TINY_TASKS))
def test_bf16_autocast_trains_and_scores_every_task_on_the_cpu(project, task_name):
    """engine.fit under bf16 autocast on 8 training images, then the test split scored under the same autocast."""
    from cv_models import get_task
    from cv_models.normalize import load_normalizer
    from tasks.training import engine

    params = project.params(**tiny_task(task_name, **{f"tasks.{task_name}.train.precision": "bf16"}))
    normstats.run(task_name, params)
    cfg = load_params(params).task(task_name)
    task = get_task(task_name, cfg)
    norm = load_normalizer(f"outputs/{task_name}/normstats", cfg.normalization)
    train = task.dataset("train", task.train_transforms(None, norm))
    train = task.subset(train, list(range(8)))
    val = task.dataset("val", task.eval_transforms(norm))
    val = task.subset(val, list(range(min(4, len(val)))))
    model = task.build_model()
    with layer_outputs() as seen:
        result = engine.fit(task, model, train, val, cfg.train, 0, Path("model.pt"))
    assert torch.bfloat16 in dtypes(seen), seen  # the convolutions ran in bf16: the setting was not ignored
    assert len(result.history) == 1 and result.history["train_loss"].notna().all()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves the weights in fp32
    acc = accelerate.Accelerator(torch.device("cpu"), "bf16")
    test = task.dataset("test", task.eval_transforms(norm))
    with acc.autocast(), layer_outputs() as seen:
        scored = task.evaluate(model, engine.make_loader(task, test, 8, False, 0), torch.device("cpu")).metrics
    assert torch.bfloat16 in dtypes(seen), seen
    value = scored[task.primary_metric]
    assert 0 <= value <= 1, scored


def test_bf16_autocast_really_runs_in_bf16():
    acc = accelerate.Accelerator(torch.device("cpu"), "bf16")
    layer = torch.nn.Linear(4, 2)
    with acc.autocast():
        assert layer(torch.randn(3, 4)).dtype == torch.bfloat16
    assert not acc.scaler.is_enabled()  # no loss scaling for bf16 (fp32's exponent range)
    assert accelerate.Accelerator(torch.device("cpu"), "fp16").scaler.is_enabled()


def test_channels_last_gives_the_same_step_and_fp32_is_untouched():
    """channels_last changes the memory layout, not the maths: one training step's loss and gradients
    match the default layout up to rounding; fp32 (the default) is no autocast and no loss scaling."""
    from cv_models.nets.small_cnn import SmallCNN

    def step(channels_last: bool):
        torch.manual_seed(0)
        model = SmallCNN(4, width=8, depth=2)
        acc = accelerate.Accelerator(torch.device("cpu"), "fp32", channels_last)
        train_model = acc.prepare(model)
        images, labels = (
            torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
            torch.tensor([0, 1, 2, 3, 0, 1]),
        )
        with acc.autocast():
            loss = torch.nn.functional.cross_entropy(train_model(acc.images(images)), labels)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()], acc

    loss, grads, acc = step(False)
    loss_cl, grads_cl, _ = step(True)
    assert loss_cl == pytest.approx(loss, abs=1e-5)
    for a, b in zip(grads, grads_cl):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not acc.scaler.is_enabled() and isinstance(acc.autocast(), __import__("contextlib").nullcontext)


@pytest.mark.parametrize("bad", [{"precision": "fp8"}, {"channels_last": "sometimes"}])
def test_bad_accelerator_settings_name_the_key(project, bad):
    key, value = next(iter(bad.items()))
    with pytest.raises(ConfigError, match=key):
        load_params(project.params(**{f"tasks.classification.train.{key}": value})).task("classification")


def test_gpu_benchmark_dry_run_prints_the_plan():
    out = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resnet50" in out.stdout and "224" in out.stdout and "256" in out.stdout
    for word in ("classification", "segmentation", "detection", "fp32", "bf16", "fp16", "channels_last", "dvc repro"):
        assert word in out.stdout, word
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert plan["dry_run"] is True and len(plan["measurements"]) >= 9


def test_deterministic_auto_is_on_for_the_cpu_off_on_a_gpu_and_true_on_a_gpu_detector_warns(capsys):
    """train.deterministic: auto keeps bit-equal CPU runs and the GPU's fast kernels; forcing it on for a
    two-stage detector on a GPU says what it costs (torchvision's roi_align leaves its CUDA kernel)."""
    from torchvision.models import resnet18
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from tasks.training.engine import deterministic_kernels, warn_slow_deterministic_roi

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert deterministic_kernels("auto", cpu) is True and deterministic_kernels("auto", gpu) is False
    assert deterministic_kernels(True, gpu) is True and deterministic_kernels(False, cpu) is False
    detector = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2)
    for model, device, on in [(detector, cpu, True), (detector, gpu, False), (resnet18(), gpu, True)]:
        warn_slow_deterministic_roi(model, device, on, "t")
        assert capsys.readouterr().out == ""
    warn_slow_deterministic_roi(detector, gpu, True, "instance_segmentation/augmented")
    out = capsys.readouterr().out
    assert "train.deterministic: true on cuda" in out and "roi_align" in out and "auto or false" in out
