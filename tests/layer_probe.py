"""What the convolutions and linear layers of any model really computed: the dtype and memory format of their
outputs, recorded by a global forward hook while a stage or a training runs (the model is built inside it)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def layer_outputs() -> Iterator[Counter]:
    """Count ``(layer kind, dtype, channels_last)`` of every Conv2d / Linear output inside the block.

    ``channels_last`` is True only for an output whose layout tells the two apart (more than one channel
    and more than one pixel), laid out channels-last and not also contiguous the default way."""
    seen: Counter = Counter()

    def hook(module: nn.Module, inputs, output) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)) and isinstance(output, torch.Tensor):
            nhwc = (
                output.ndim == 4
                and output.shape[1] > 1
                and output.shape[2] * output.shape[3] > 1
                and output.is_contiguous(memory_format=torch.channels_last)
                and not output.is_contiguous()
            )
            seen[(type(module).__name__, output.dtype, nhwc)] += 1

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def dtypes(seen: Counter) -> set[torch.dtype]:
    return {dtype for (_, dtype, _) in seen}


def channels_last_convs(seen: Counter) -> int:
    return sum(n for (kind, _, nhwc), n in seen.items() if kind == "Conv2d" and nhwc)
