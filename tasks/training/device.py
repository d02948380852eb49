"""Where and how a training run computes, kept out of ``engine.fit``: the device, torch's threads, deterministic
kernels, and the DataLoader workers the cores allow."""

from __future__ import annotations

import os

import torch
from torch import nn

from tasks.config import TrainConfig
from tasks.training import accelerate


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and accelerate.launched_by_torchrun():
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per torchrun process
    return torch.device(name)


def set_threads(n: int) -> None:
    torch.set_num_threads(n or os.cpu_count() or 1)


def deterministic_kernels(setting: bool | str, device: torch.device) -> bool:
    """``train.deterministic`` for this device. ``auto``: on the CPU (it costs nothing there and gives bit-equal
    reruns), off on a GPU, where deterministic kernels cost speed and, for Faster/Mask R-CNN, much more: with
    deterministic algorithms on, torchvision's roi_align leaves its CUDA kernel for a pure-Python version
    (an epoch of Mask R-CNN on coco128_json took 104 s on an H200, against 7 s with them off; README "Run on an
    NVIDIA H200")."""
    return device.type == "cpu" if setting == "auto" else bool(setting)


def set_determinism(on: bool) -> None:
    """Deterministic kernels where torch has them (warn-only: an op without one still runs, with a warning),
    cuDNN without autotuning; off: torch picks the fastest kernels and cuDNN autotunes (as torchvision's
    reference scripts do)."""
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read when CUDA starts)


def warn_slow_deterministic_roi(model: nn.Module, device: torch.device, deterministic: bool, desc: str) -> None:
    """Say so when ``train.deterministic: true`` sends a GPU detector's RoI pooling down torchvision's slow path."""
    from torchvision.ops import MultiScaleRoIAlign

    if deterministic and device.type != "cpu" and any(isinstance(m, MultiScaleRoIAlign) for m in model.modules()):
        print(
            f"[{desc}] WARNING: train.deterministic: true on {device.type} makes torchvision's roi_align use its "
            f"pure-Python version (Mask R-CNN epochs measured 15x slower on an H200); set "
            f"train.deterministic: auto or false to train at the GPU's speed",
            flush=True,
        )


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share), else all of them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(cfg: TrainConfig, cores: int | None = None) -> int:
    """``train.num_workers`` as a number. ``auto``: none on 2 cores or fewer, where a worker process competes with
    training for the same cores and costs more than it saves (benchmarks/epoch_time.py measured it); otherwise the
    cores torch's threads leave free, at most 8."""
    if cfg.num_workers != "auto":
        return cfg.num_workers
    cores = cores or available_cores()
    if cores <= 2:
        return 0
    threads = cfg.num_threads or cores
    return max(0, min(cores - threads, 8))


def prepare_device(cfg: TrainConfig, model: nn.Module, desc: str) -> tuple[torch.device, accelerate.Accelerator]:
    """The device, threads and kernels ``cfg`` asks for, the model moved there, and its accelerator."""
    device = pick_device(cfg.device)
    set_threads(cfg.num_threads)
    deterministic = deterministic_kernels(cfg.deterministic, device)
    set_determinism(deterministic)
    warn_slow_deterministic_roi(model, device, deterministic, desc)
    model.to(device)
    return device, accelerate.Accelerator(device, cfg.precision, cfg.channels_last, cfg.compile)
