"""The registry of the networks written in this project, apart from the package's ``__init__`` (which imports
the networks so that they register) so that the networks import it without an import circle."""

from __future__ import annotations

from typing import Callable

from torch import nn

NETS: dict[str, Callable[..., nn.Module]] = {}


def register_net(name: str):
    def wrap(fn):
        NETS[name] = fn
        return fn

    return wrap
