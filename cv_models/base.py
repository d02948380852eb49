"""The one small interface every CV task implements, and the registry of tasks.

The pipeline stages in ``tasks/`` know nothing about classification, masks or
boxes: they call these methods. Adding a task means writing one module with a
:class:`CVTask` subclass decorated with :func:`register_task` and importing it
in ``cv_models/__init__.py``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from cv_models.augment import AUGMENTATIONS, Augmentation
from cv_models.settings import AugmentConfig, TaskConfig

TASKS: dict[str, type["CVTask"]] = {}


def register_task(cls: type["CVTask"]) -> type["CVTask"]:
    """Add a task to the registry, after checking that its augment schema and its augmentation registry
    name the same augmentations (a Switch without an entry would be skipped, an entry without a Switch unreachable)."""
    declared = cls.augment_schema().switch_names()
    registered = list(cls.augmentations)
    if sorted(declared) != sorted(registered):
        raise TypeError(f"task {cls.name!r}: augment schema switches {sorted(declared)} but registered augmentations "
                        f"{sorted(registered)}: add the missing Switch field or registry entry")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str, cfg: TaskConfig) -> "CVTask":
    if name not in TASKS:
        raise KeyError(f"unknown CV task {name!r}; registered: {sorted(TASKS)}")
    return TASKS[name](cfg)


class DataError(ValueError):
    """Bad input data: the message names the file and the rule it breaks."""


@dataclass
class Check:
    """One great-expectations expectation on one table, with the rule in plain words.

    ``table`` names a DataFrame returned by :meth:`CVTask.validation_tables`; failing
    rows are reported by their ``path`` column (or ``key_column``).
    """

    table: str
    rule: str
    expectation: Any  # a gx.expectations.Expectation
    key_column: str = "path"


@dataclass
class EvalResult:
    metrics: dict[str, float]  # flat name -> value; must contain the task's primary metric
    predictions: Any = None  # task-specific, consumed by report()/draw
    per_class: pd.DataFrame | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class CVTask(ABC):
    """A computer-vision task: its data, model, loss, metrics and pictures."""

    name: ClassVar[str]
    primary_metric: ClassVar[str]  # higher is better; picks the best checkpoint and the headline figure
    settings: ClassVar[type[TaskConfig]] = TaskConfig  # the schema of tasks.<name> (cv_models.settings.task_settings)
    augmentations: ClassVar[dict[str, Augmentation]] = AUGMENTATIONS  # one entry per Switch of settings' augment

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    @classmethod
    def augment_schema(cls) -> type[AugmentConfig]:
        """The class of this task's ``augment`` section (the shared switches plus the task's own)."""
        return cls.settings.model_fields["augment"].annotation

    # ------------------------------------------------------------------ data
    @abstractmethod
    def validation_tables(self) -> dict[str, pd.DataFrame]:
        """pandas tables describing every sample (and annotation); raise DataError when unreadable."""

    @abstractmethod
    def checks(self, tables: dict[str, pd.DataFrame]) -> list[Check]:
        """The great-expectations rules the tables must satisfy before training."""

    def validation_notes(self, tables: dict[str, pd.DataFrame]) -> list[str]:
        """Findings that are reported but do not stop the run (e.g. converted grayscale images)."""
        return []

    @abstractmethod
    def class_names(self) -> list[str]:
        ...

    @abstractmethod
    def dataset(self, split: str, transforms: Callable | None) -> Dataset:
        """Samples of one split as ``(image, target)``, the transforms applied jointly."""

    def collate(self, batch: list) -> Any:
        return torch.utils.data.default_collate(batch)

    def subset(self, dataset: Dataset, indices: list[int]) -> Dataset:
        """The samples at ``indices`` as a dataset that :meth:`evaluate` accepts."""
        return torch.utils.data.Subset(dataset, indices)

    # ------------------------------------------------------------ transforms
    @abstractmethod
    def train_transforms(self, augment: AugmentConfig | None, normalize: Callable | None) -> Callable:
        """Training-time transforms; ``augment=None`` is the plain baseline."""

    @abstractmethod
    def eval_transforms(self, normalize: Callable | None) -> Callable:
        ...

    def batch_mixer(self, augment: AugmentConfig | None) -> Callable | None:
        """Batch-level augmentation (MixUp / CutMix) as ``(images, targets) -> (images, targets)``."""
        return None

    # ------------------------------------------------------------------ model
    @abstractmethod
    def build_model(self) -> nn.Module:
        ...

    @abstractmethod
    def training_loss(self, model: nn.Module, images: Any, targets: Any) -> torch.Tensor:
        """Loss of one batch, model in train mode (the loss chosen to match the metric)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device) -> EvalResult:
        ...

    @abstractmethod
    def dummy_result(self, train: Dataset, evaluation: Dataset) -> EvalResult:
        """Score of the dummy solution fitted on ``train`` and scored on ``evaluation``."""

    # ---------------------------------------------------------- visualisation
    def display_image(self, image: torch.Tensor, normalize: Callable | None) -> torch.Tensor:
        """A training-pipeline image back to [0, 1] pixels (undo the normalisation the transforms applied)."""
        return normalize.undo(image) if normalize is not None else image

    @abstractmethod
    def draw(self, image: torch.Tensor, target: Any) -> torch.Tensor:
        """uint8 CxHxW picture of one (un-normalised, [0,1] float) image with its target drawn on it."""

    def report(self, results: dict[str, EvalResult], test: Dataset, out_dir: Path) -> list[Path]:
        """Task-specific pictures and tables of the evaluation (confusion matrix, overlays, ...)."""
        return []
