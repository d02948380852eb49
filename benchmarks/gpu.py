"""Training throughput on a GPU, fp32 against mixed precision with channels-last, then the main job.

    python benchmarks/gpu.py              # on a machine with a CUDA GPU (make gpu-benchmark)
    python benchmarks/gpu.py --dry-run    # anywhere: print what it would measure and run

For each model it times full training steps (forward, fp32 loss, backward, optimizer step; synthetic
batches on the GPU, so the data loader is not what is measured) and prints images/s per setting:
fp32, fp32 + channels_last, bf16 + channels_last, fp16 + channels_last (with a GradScaler, as
train.precision: fp16 does). Then it runs the main job (`dvc repro`) with the params as they are:
set train.precision / channels_last in params.yaml first to run the job the fast way.
The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

# (task, torchvision builder, image size, batch) -- classification at the usual ImageNet setting
MODELS = [
    ("classification", "resnet50", 224, 256),
    ("segmentation", "deeplabv3_resnet50", 512, 16),
    ("detection", "fasterrcnn_resnet50_fpn", 640, 16),
]
SETTINGS = [("fp32", False), ("fp32", True), ("bf16", True), ("fp16", True)]


def build(task: str, name: str, num_classes: int = 10):
    from torchvision.models import get_model

    # no download: random weights (the speed is the same as with pretrained weights)
    return get_model(name, weights=None, num_classes=num_classes, **STEPS[task].builder_args)


def labels(images, size: int, n: int, device):
    import torch

    return images, torch.randint(0, 10, (n,), device=device)


def masks(images, size: int, n: int, device):
    import torch

    return images, torch.randint(0, 10, (n, size, size), device=device)


def boxes(images, size: int, n: int, device):
    import torch

    box = torch.tensor([[size * 0.2, size * 0.2, size * 0.6, size * 0.7]], device=device)
    return list(images), [{"boxes": box, "labels": torch.tensor([1], device=device)} for _ in range(n)]


def logits_loss(model, images, targets):
    import torch.nn.functional as F

    return F.cross_entropy(model(images).float(), targets)


def dense_loss(model, images, targets):
    import torch.nn.functional as F

    return F.cross_entropy(model(images)["out"].float(), targets)


def summed_losses(model, images, targets):  # torchvision detectors return their losses in train mode
    return sum(v.float() for v in model(images, targets).values())


@dataclass(frozen=True)
class Step:
    """What one task's torchvision model is built with, fed and scored by in a training step."""

    batch: Callable  # (images, size, n, device) -> (inputs, targets): synthetic targets on the GPU
    loss: Callable  # (model, inputs, targets) -> loss
    builder_args: dict = field(default_factory=dict)


STEPS = {
    "classification": Step(labels, logits_loss),
    "segmentation": Step(masks, dense_loss, {"weights_backbone": None}),
    "detection": Step(boxes, summed_losses, {"weights_backbone": None}),
}


def batch(task: str, size: int, n: int, device):
    import torch

    return STEPS[task].batch(torch.rand(n, 3, size, size, device=device), size, n, device)


def loss_of(task: str, model, images, targets):
    return STEPS[task].loss(model, images, targets)


def measure(
    task: str, name: str, size: int, n: int, precision: str, channels_last: bool, steps: int, warmup: int
) -> float:
    import torch

    from tasks.training.accelerate import Accelerator

    device = torch.device("cuda")
    acc = Accelerator(device, precision, channels_last)
    model = acc.prepare(build(task, name).to(device))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images, targets = batch(task, size, n, device)
    images = acc.images(images)
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with acc.autocast():
            loss = loss_of(task, model, images, targets)
        opt.zero_grad(set_to_none=True)
        acc.backward_step(loss, opt, model.parameters(), 0.0)
    torch.cuda.synchronize()
    return steps * n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan; needs no GPU")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--skip-main-job", action="store_true", help="only the throughput table")
    p.add_argument("--tasks", nargs="+", choices=[t for t, *_ in MODELS], help="time these tasks' models only")
    args = p.parse_args(argv)
    plan = [
        {"task": t, "model": m, "image_size": s, "batch": b, "precision": pr, "channels_last": cl}
        for t, m, s, b in MODELS
        for pr, cl in SETTINGS
        if not args.tasks or t in args.tasks
    ]
    main_job = ["dvc", "repro"]
    if args.dry_run:
        print("dry run: on a CUDA machine this would time training steps (images/s) for")
        for r in plan:
            print(
                f"  {r['task']:<15} {r['model']:<25} {r['image_size']} px, batch {r['batch']:<4} "
                f"{r['precision']}{' + channels_last' if r['channels_last'] else ''}"
            )
        print(f"then run the main job: {' '.join(main_job)}")
        print(json.dumps({"dry_run": True, "measurements": plan, "main_job": main_job}))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU machine, or use --dry-run", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    results = []
    for r in plan:
        if r["precision"] == "bf16" and not torch.cuda.is_bf16_supported():
            r["images_per_second"] = None
        else:
            r["images_per_second"] = round(
                measure(
                    r["task"],
                    r["model"],
                    r["image_size"],
                    r["batch"],
                    r["precision"],
                    r["channels_last"],
                    args.steps,
                    args.warmup,
                ),
                1,
            )
            torch.cuda.empty_cache()
        results.append(r)
        print(
            f"{r['task']:<15} {r['model']:<25} {r['precision']}{' + channels_last' if r['channels_last'] else '':<16} "
            f"{r['images_per_second']} images/s",
            flush=True,
        )
    job = None
    if not args.skip_main_job:
        if shutil.which("dvc") is None:
            print("dvc not on PATH: activate the project's venv", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        job = {
            "command": main_job,
            "returncode": subprocess.run(main_job).returncode,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    print(
        json.dumps({"dry_run": False, "device": torch.cuda.get_device_name(), "measurements": results, "main_job": job})
    )
    return 0 if job is None or job["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    sys.exit(main())
