"""The bare PyTorch loop the step benchmarks (``benchmarks/bench_*_step.py``) hold the pipeline against: what one
would write by hand. Each benchmark passes its task's loss of a batch and its validation pass; the loop around
them is this one, so the four benchmarks time the same thing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def run_bare_loop(
    model: nn.Module,
    loader: Iterable,
    val_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epochs: int,
    loss_of: Callable[[nn.Module, Any, Any], torch.Tensor],
    validate: Callable[[nn.Module, Iterable], Any],
) -> tuple[float, float]:
    """Train ``epochs`` epochs (forward, ``loss_of``, backward, optimiser and schedule step per batch) with one
    ``validate`` pass (under ``torch.no_grad``) after each. Returns the wall-clock and CPU seconds it took."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        model.train()
        for images, targets in loader:
            loss = loss_of(model, images, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            validate(model, val_loader)
    return time.perf_counter() - start, time.process_time() - cpu
