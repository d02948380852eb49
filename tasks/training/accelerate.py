"""Accelerator and multi-process settings for the training loop, kept out of ``engine.fit``:
mixed precision (autocast + GradScaler), channels-last, torch.compile, pinned memory, and DDP
through torchrun (process group from torchrun's environment, a DistributedSampler, rank 0 alone
writing). With the defaults (fp32, one process) every helper is a no-op, so results don't change."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- processes (torchrun)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the env):
    NCCL when every process has a GPU, gloo on the CPU. False when not launched by torchrun."""
    if not launched_by_torchrun() or dist.is_initialized():
        return dist.is_initialized()
    cuda = torch.cuda.is_available() and os.environ.get("CV_DEVICE", "auto") != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast(obj: Any) -> Any:
    """Rank 0's value on every rank (the validation metrics, scored on rank 0 only)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's value, on every rank (the per-rank RNG states the checkpoint keeps)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(value: float) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def local_batch_size(global_batch: int) -> int:
    """``train.batch_size`` is the global batch: each of N processes takes batch_size / N, so the
    steps per epoch, the schedule and the learning rate stay those of one process."""
    n = world_size()
    if global_batch % n:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {n} processes")
    return global_batch // n


def train_sampler(dataset, seed: int):
    """Under torchrun: each rank's disjoint share of one shuffle seeded by ``seed`` (+ the epoch);
    None for one process, which keeps the loader's own shuffle (unchanged single-process results)."""
    if world_size() == 1:
        return None
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)


def own_rng_state(checkpoint: dict) -> torch.Tensor:
    """This rank's torch RNG state from a checkpoint (rank 0 saves every rank's under torchrun)."""
    states = checkpoint.get("rank_rngs")
    return states[rank()] if states is not None and len(states) == world_size() else checkpoint["rng"]


# ---------------------------------------------------------------- precision and memory format


@dataclass
class Accelerator:
    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self):
        # fp16 needs loss scaling against gradient underflow; bf16 has fp32's range and doesn't
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def prepare(self, model: nn.Module) -> nn.Module:
        """The module the training step calls: channels-last, compiled, wrapped in DDP under torchrun.
        ``model`` itself stays the plain module (its state_dict is what is saved and scored)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        train_model = model
        if world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.compile:
            train_model = torch.compile(train_model)
        return train_model

    def images(self, images):
        """Channels-last batches for 4-d image tensors (detection's image lists are left as they are)."""
        if self.channels_last and isinstance(images, torch.Tensor) and images.ndim == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params, clip_norm: float) -> None:
        self.scaler.scale(loss).backward()
        if clip_norm > 0:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
