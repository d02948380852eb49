"""Settings of classification: its ``data.options`` and ``model.options``, and the schema of ``tasks.classification``."""

from __future__ import annotations

from typing import Any, Literal

from cv_models.settings import Strict, task_settings

DUPLICATE_POLICIES = ("fail", "drop")
REQUIRED_SPLITS = ("train", "val")  # every class must appear here; test gaps are reported


class ClassificationDataOptions(Strict):
    """``data.options`` of classification (format imagefolder)."""

    # byte-identical files under two classes: fail (a validation rule fails) | drop (every copy left out, named in the notes)
    conflicting_duplicates: Literal["fail", "drop"] = "fail"


class ClassificationModelOptions(Strict):
    """``model.options`` of classification."""

    # extra keyword arguments of a torchvision classifier's builder (e.g. zero_init_residual: true for a resnet);
    # the builder rejects one it does not take when the model is built
    kwargs: dict[str, Any] = {}


SETTINGS = task_settings(
    "Classification", data_options=ClassificationDataOptions, model_options=ClassificationModelOptions
)
