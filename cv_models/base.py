"""The one small interface every CV task implements, and the registry of tasks.

The pipeline stages in ``tasks/`` know nothing about classification, masks or
boxes: they call these methods. Adding a task means writing one module with a
:class:`CVTask` subclass decorated with :func:`register_task` and importing it
in ``cv_models/__init__.py``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, cast

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from cv_models.augment import AUGMENTATIONS, Augmentation
from cv_models.normalize import Normalize, load_normalizer
from cv_models.pretrained import input_convention
from cv_models.settings import AugmentConfig, TaskConfig
from cv_models.weights import load_pretrained, resolve_imagenet

if TYPE_CHECKING:
    from cv_models.normalize import Normalize

TASKS: dict[str, type["CVTask"]] = {}


def register_task(cls: type["CVTask"]) -> type["CVTask"]:
    """Add a task to the registry, after checking that its augment schema and its augmentation registry
    name the same augmentations (a Switch without an entry would be skipped, an entry without a Switch unreachable)."""
    declared = cls.augment_schema().switch_names()
    registered = list(cls.augmentations)
    if sorted(declared) != sorted(registered):
        raise TypeError(
            f"task {cls.name!r}: augment schema switches {sorted(declared)} but registered augmentations "
            f"{sorted(registered)}: add the missing Switch field or registry entry"
        )
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
class Prediction:
    """One image's prediction at the input's own resolution, as the predict stage writes it."""

    records: list[dict[str, Any]]  # rows of the task's results file (a CSV row, or COCO results entries)
    objects: list[str]  # class names found in the image (the summary counts them)
    mask: Any = None  # segmentation: HxW uint8 class indices
    overlay: torch.Tensor | None = None  # uint8 3xHxW picture of the prediction (dense tasks)


def never_predicted(
    names: list[str], true_counts: Sequence[float], predicted_counts: Sequence[float]
) -> dict[str, float]:
    """``never_predicted/<class>: 1.0`` for each class present in the scored data that the model never predicts
    (a half-collapsed model: the warnings name them); nothing for the others."""
    return {f"never_predicted/{c}": 1.0 for c, t, p in zip(names, true_counts, predicted_counts) if t > 0 and p == 0}


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
    results_file: ClassVar[str] = "coco_results.json"  # what the predict stage writes the records to

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        # where the normstats stage's files are; None = outputs/<task>/normstats of the working folder
        self.normstats_dir: Path | None = None
        self.weights_record: dict[str, str] = {}  # where build_model's ImageNet weights came from (MLflow params)
        self.skip_imagenet_load = False  # saved weights will replace them (for_saved_weights)
        self._hook_frozen: list[str] = []  # encoder parameters frozen by before_epoch (freeze_encoder_epochs)

    @classmethod
    def augment_schema(cls) -> type[AugmentConfig]:
        """The class of this task's ``augment`` section (the shared switches plus the task's own)."""
        return cast(type[AugmentConfig], cls.settings.model_fields["augment"].annotation)

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

    def validation_summaries(self, tables: dict[str, pd.DataFrame]) -> dict[str, str]:
        """Markdown tables of the data (e.g. objects per class and split) for the validation report, by title."""
        return {}

    @abstractmethod
    def class_names(self) -> list[str]: ...

    def sample_labels(self, dataset: Dataset[Any]) -> list[int] | None:
        """Each sample's class index, for subsets that keep every class's share; None where a sample has no
        single class (boxes, masks)."""
        return None

    def object_boxes(self, split: str) -> list[dict[str, Any]] | None:
        """The split's images with their objects' boxes in the original pixels, for the crops stage:
        ``{"path", "image_id", "file_name", "boxes": [[x0, y0, x1, y1], ...], "labels": [k + 1 for class k]}``.
        None for a task without boxes."""
        return None

    @abstractmethod
    def dataset(self, split: str, transforms: Callable[..., Any] | None) -> Dataset[Any]:
        """Samples of one split as ``(image, target)``, the transforms applied jointly."""

    def collate(self, batch: list[Any]) -> Any:
        return torch.utils.data.default_collate(batch)

    def subset(self, dataset: Dataset[Any], indices: list[int]) -> Dataset[Any]:
        """The samples at ``indices`` as a dataset that :meth:`evaluate` accepts."""
        return torch.utils.data.Subset(dataset, indices)

    # ------------------------------------------------------------ transforms
    @abstractmethod
    def train_transforms(
        self, augment: AugmentConfig | None, normalize: Callable[..., Any] | None
    ) -> Callable[..., Any]:
        """Training-time transforms; ``augment=None`` is the plain baseline."""

    @abstractmethod
    def eval_transforms(self, normalize: Callable[..., Any] | None) -> Callable[..., Any]: ...

    def batch_mixer(self, augment: AugmentConfig | None) -> Callable[..., Any] | None:
        """Batch-level augmentation (MixUp / CutMix) as ``(images, targets) -> (images, targets)``."""
        return None

    # ------------------------------------------------------------------ model
    @abstractmethod
    def build_model(self) -> nn.Module: ...

    # ---------------------------------------------------- pretrained encoder
    def pretrained_name(self) -> str | None:
        """The network (``timm:<arch>`` or a torchvision name) whose ImageNet weights ``model.weights: imagenet``
        loads into this task's model: the classifier itself, or the encoder of a dense model. None: no such network."""
        return None

    def encoder_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the pretrained part (what freeze_encoder_epochs freezes and encoder_lr_factor slows;
        :meth:`is_encoder` may decide otherwise)."""
        return ()

    @classmethod
    def for_saved_weights(cls, cfg: TaskConfig) -> "CVTask":
        """The task whose ``build_model`` loads no initial weights, for a model whose saved weights replace them.
        ``weights: imagenet`` is kept (its input normalisation goes with the model), the files are not read."""
        imagenet = cfg.model.weights == "imagenet"
        if not imagenet:
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": "none"})})
        task = cls(cfg)
        task.skip_imagenet_load = imagenet
        return task

    def load_imagenet(self, module: nn.Module, head_prefixes: tuple[str, ...] = ()) -> None:
        """``module`` (the model or its encoder) from the ImageNet weights of :meth:`pretrained_name`, found offline;
        where they came from is kept in ``weights_record`` for MLflow."""
        name = self.pretrained_name()
        if name is None:
            raise ValueError(
                f"model.weights: imagenet: {self.cfg.model.name!r} has no pretrained network; for "
                f"{self.name} use a timm:<arch> model or encoder"
            )
        if self.skip_imagenet_load:
            return
        resolved = resolve_imagenet(name, self.cfg.model.weights_file)
        load_pretrained(module, resolved, head_prefixes)
        self.weights_record = {"weights_network": name, **resolved.record(), **self.normalization_record()}

    def uses_imagenet_convention(self) -> bool:
        return self.cfg.model.weights == "imagenet"

    def input_normalizer(self, stats_dir: str | Path) -> Normalize | None:
        """The input normalisation: the pretrained weights' own convention with ``weights: imagenet`` (the
        normstats stage still records the data's statistics), else ``normalization`` from those statistics."""
        if not self.uses_imagenet_convention():
            return load_normalizer(stats_dir, self.cfg.normalization)
        c = input_convention(self.imagenet_network())
        return Normalize("per_channel_std", torch.tensor(c.mean), torch.tensor(c.std))

    def imagenet_network(self) -> str:
        """The network whose ImageNet weights ``model.weights: imagenet`` asks for; an error for a model without one."""
        name = self.pretrained_name()
        if name is None:
            raise DataError(
                f"{self.name}: model.weights: imagenet, but model {self.cfg.model.name!r} has no network "
                f"with ImageNet weights (rule: model.weights: imagenet needs a pretrained architecture)"
            )
        return name

    def normalization_record(self) -> dict[str, str]:
        c = input_convention(self.imagenet_network())
        return {
            "input_normalization": f"mean {list(c.mean)}, std {list(c.std)}: {c.why}, the convention of the "
            f"pretrained weights (model.weights: imagenet), not normalization "
            f"{self.cfg.normalization!r} from the data's statistics"
        }

    def is_encoder(self, parameter: str) -> bool:
        prefixes = self.encoder_prefixes()
        return bool(prefixes) and parameter.startswith(prefixes)

    def lr_factor(self, parameter: str) -> float:
        """The parameter's learning rate as a fraction of optimizer.lr: encoder_lr_factor for the encoder."""
        return self.cfg.model.encoder_lr_factor if self.is_encoder(parameter) else 1.0

    def before_epoch(self, model: nn.Module, epoch: int) -> None:
        """The loop calls this after ``model.train()``: for the first ``freeze_encoder_epochs`` epochs the encoder's
        trainable parameters are frozen and its BatchNorm layers kept in eval mode; afterwards they train again."""
        n = self.cfg.model.freeze_encoder_epochs
        if not n:
            return
        if epoch <= n:
            self._hook_frozen = self._hook_frozen or [
                k for k, p in model.named_parameters() if self.is_encoder(k) and p.requires_grad
            ]
            for name, p in model.named_parameters():
                p.requires_grad = p.requires_grad and name not in self._hook_frozen
            for name, m in model.named_modules():
                if self.is_encoder(name + ".") and isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        elif self._hook_frozen:
            for name, p in model.named_parameters():
                p.requires_grad = p.requires_grad or name in self._hook_frozen
            self._hook_frozen = []

    @abstractmethod
    def training_loss(self, model: nn.Module, images: Any, targets: Any) -> torch.Tensor:
        """Loss of one batch, model in train mode (the loss chosen to match the metric)."""

    @abstractmethod
    def evaluate(
        self, model: nn.Module, loader: torch.utils.data.DataLoader[Any], device: torch.device, native: bool = False
    ) -> EvalResult:
        """Metrics of ``model`` on ``loader`` (not shuffled). ``native``: score every image at its own resolution
        against its original annotation, predictions mapped back as :meth:`predict_image` does (the evaluate
        stage: the figures users and papers report), and keep the per-image predictions :meth:`report` writes.
        False: at the training size where that differs (the per-epoch validation: cheaper, and it only ranks epochs)."""

    @abstractmethod
    def dummy_result(self, train: Dataset[Any], evaluation: Dataset[Any]) -> EvalResult:
        """Score of the dummy solution fitted on ``train`` and scored on ``evaluation``."""

    # -------------------------------------------------------------- inference
    def inference_config(self) -> TaskConfig:
        """The settings a trained model needs to be rebuilt and run without its dataset: the class list
        written into ``data.classes`` (so no data folder is read). Tasks resolve anything else read from data."""
        return self.cfg.model_copy(update={"data": self.cfg.data.model_copy(update={"classes": self.class_names()})})

    def predict_transform(self, normalize: Callable[..., Any] | None) -> Callable[..., Any]:
        """PIL image -> model input tensor: the evaluation's resizing and normalisation, for an image alone."""
        return self.eval_transforms(normalize)

    @abstractmethod
    def predict_image(
        self, model: nn.Module, image: Any, normalize: Callable[..., Any] | None, image_id: int
    ) -> Prediction:
        """The model's prediction on one RGB PIL image, mapped back to the image's own resolution."""

    # the predict stage's summary: how many of what, per class
    counted_as: ClassVar[str] = "objects"  # what :attr:`Prediction.objects` counts, in words (a table header)

    def counted_classes(self) -> list[str]:
        """The classes the predict summary lists (with a count of 0 where none was found)."""
        return self.class_names()

    def result_rows(self, file: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One image's :attr:`Prediction.records` as rows of :attr:`results_file`: a CSV row starts with the
        input file; a COCO results entry names its image by ``image_id`` alone."""
        if Path(self.results_file).suffix == ".csv":
            return [{"file": file, **r} for r in records]
        return records

    def write_results(self, rows: list[dict[str, Any]], out: Path) -> Path:
        """Write every image's :meth:`result_rows` to ``out``/:attr:`results_file` (a CSV table, or a JSON list
        of COCO results entries); returns the file."""
        path = out / self.results_file
        if path.suffix == ".csv":
            pd.DataFrame(rows).to_csv(path, index=False)
        else:
            path.write_text(json.dumps(rows))
        return path

    # ----------------------------------------------------------------- export
    # the exported graph: a float N x 3 x H x W batch (``export_batched``) or one 3 x H x W image, H x W the training
    # size, and its outputs
    export_outputs: ClassVar[tuple[str, ...]] = ("logits",)
    export_batched: ClassVar[bool] = True
    normalizes_inside: ClassVar[bool] = False  # detectors normalise inside the network

    def model_input(self, image: Any, normalize: Callable[..., Any] | None) -> torch.Tensor:
        """One RGB PIL image as the exported graph's input (3 x H x W float, resized and normalised)."""
        x: torch.Tensor = self.predict_transform(None if self.normalizes_inside else normalize)(image)
        return x.as_subclass(torch.Tensor)

    def export_module(self, model: nn.Module) -> nn.Module:
        """The model as a module of plain tensors in and out (what TorchScript and ONNX take)."""
        return model

    # ---------------------------------------------------------- visualisation
    def display_image(self, image: torch.Tensor, normalize: Normalize | None) -> torch.Tensor:
        """A training-pipeline image back to [0, 1] pixels (undo the normalisation the transforms applied)."""
        return normalize.undo(image) if normalize is not None else image

    @abstractmethod
    def draw(self, image: torch.Tensor, target: Any) -> torch.Tensor:
        """uint8 CxHxW picture of one (un-normalised, [0,1] float) image with its target drawn on it."""

    def report(self, results: dict[str, EvalResult], test: Dataset[Any], out_dir: Path) -> list[Path]:
        """Task-specific pictures and tables of the evaluation (confusion matrix, overlays, ...), and each model's
        per-image predictions at the images' own resolution with a ``RECOMPUTE.md`` saying how to rescore them."""
        return []


def in_order(dataset: Dataset[Any]) -> tuple[Dataset[Any], list[int]]:
    """The task's own dataset under ``dataset`` (a Subset or not) and the indices a non-shuffled loader visits."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner, indices = in_order(dataset.dataset)
        return inner, [indices[i] for i in dataset.indices]
    return dataset, list(range(len(cast(Sized, dataset))))
