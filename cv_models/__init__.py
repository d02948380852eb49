"""Task-specific code: one module per CV task behind the interface in :mod:`cv_models.base`.

The names below load the task modules (and with them torch and torchvision) on first use, not when a light
module of the package is imported (``cv_models.settings``, ``cv_models.data.shapes``): a stage that needs no
model, such as ``generate``, starts without them."""

from __future__ import annotations

import importlib

__all__ = ["TASKS", "CVTask", "DataError", "get_task", "register_task"]
TASK_MODULES = ("classification", "segmentation", "detection", "instance_segmentation")  # importing one registers it


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'cv_models' has no attribute {name!r}")
    base = importlib.import_module("cv_models.base")
    for module in TASK_MODULES:
        importlib.import_module(f"cv_models.{module}")
    return getattr(base, name)
