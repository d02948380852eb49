"""Registry of the networks written in this project (torchvision's come by name through get_model)."""
from __future__ import annotations

from typing import Callable

from torch import nn

NETS: dict[str, Callable[..., nn.Module]] = {}


def register_net(name: str):
    def wrap(fn):
        NETS[name] = fn
        return fn

    return wrap


from cv_models.nets import small_cnn  # noqa: E402,F401  (registers)
from cv_models.nets import unet  # noqa: E402,F401  (registers)
