"""The classification task: what it lists, checks, builds, trains with and scores, each step delegated to the
package's modules (data, validation, report) where it is more than a few lines."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cv_models.augment import build_transforms
from cv_models.base import Check, CVTask, EvalResult, Prediction, register_task
from cv_models.classification import validation
from cv_models.classification.data import ImageFolderDataset, PlainTransform, batch_mixer, list_samples
from cv_models.classification.report import label_text, score, write_report
from cv_models.classification.settings import SETTINGS
from cv_models.nets import NETS
from cv_models.pretrained import split_name
from cv_models.settings import AugmentConfig
from cv_models.weights import freeze, load_into, read_checkpoint, torchvision_state_dict


@register_task
class ClassificationTask(CVTask):
    name = "classification"
    primary_metric = "accuracy"
    settings = SETTINGS
    results_file = "predictions.csv"
    counted_as = "images"  # one predicted class per image

    _listing: tuple[list[dict], list[str]] | None = None  # the folder walk, done once per task object
    _dropped_duplicates: list[str] = []  # groups of identical files under two classes left out (policy drop)
    _head = ""  # the name of the head layer, found when the model is built

    # ------------------------------------------------------------------ data
    def _samples(self) -> tuple[list[dict], list[str]]:
        if self._listing is None:
            rows, classes, self._dropped_duplicates = list_samples(self.name, self.cfg.data)
            self._listing = (rows, classes)
        return self._listing

    def class_names(self) -> list[str]:
        if self.cfg.data.classes:
            return list(self.cfg.data.classes)
        return self._samples()[1]

    def validation_tables(self) -> dict[str, pd.DataFrame]:
        rows, folders = self._samples()
        return validation.tables(rows, folders, self.cfg.data.classes or folders)

    def checks(self, tables: dict[str, pd.DataFrame]) -> list[Check]:
        return validation.checks(self.cfg.data, tables)

    def validation_notes(self, tables: dict[str, pd.DataFrame]) -> list[str]:
        return validation.notes(tables, self.cfg.data.color_mode, self._dropped_duplicates)

    def dataset(self, split: str, transforms) -> ImageFolderDataset:
        rows, _ = self._samples()
        return ImageFolderDataset([r for r in rows if r["split"] == split], self.class_names(), transforms)

    def sample_labels(self, dataset) -> list[int]:
        return dataset.labels

    # ------------------------------------------------------------ transforms
    def train_transforms(self, augment: AugmentConfig | None, normalize):
        if augment is None or not augment.enabled_names():
            return PlainTransform(self.cfg.image_size, normalize)
        return build_transforms(self.cfg.image_size, augment, normalize)

    def eval_transforms(self, normalize):
        return PlainTransform(self.cfg.image_size, normalize)

    def batch_mixer(self, augment: AugmentConfig | None):
        """torchvision's MixUp / CutMix (classification is the case they support), each batch with prob p."""
        if augment is None:
            return None
        return batch_mixer(augment, len(self.class_names()))

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        m = self.cfg.model
        model = _network(m, len(self.class_names()))
        head = self._head = _head_name(model)
        self._load_weights(model, m.weights, head)
        if m.freeze_backbone:
            for name, p in model.named_parameters():
                p.requires_grad = name.startswith(head + ".")
        freeze(model, m.frozen_layers)
        return model

    def _load_weights(self, model: nn.Module, weights: str, head: str) -> None:
        """``model.weights``: every layer but the head from ImageNet, torchvision's weights or a checkpoint."""
        if weights == "imagenet":
            self.load_imagenet(model, head_prefixes=(head + ".",))
            _zero_head(model, head)
        elif weights.startswith("torchvision:"):
            state = torchvision_state_dict(self.cfg.model.name, weights.split(":", 1)[1])
            load_into(model, state, weights, head_prefixes=(head + ".",))
        elif weights != "none":
            load_into(model, read_checkpoint(weights), weights, head_prefixes=(head + ".",))

    def pretrained_name(self) -> str | None:
        return None if self.cfg.model.name in NETS else self.cfg.model.name

    def is_encoder(self, parameter: str) -> bool:
        """Every layer but the head (the last Linear layer, found when the model is built)."""
        return self.pretrained_name() is not None and not parameter.startswith(self._head + ".")

    # -------------------------------------------------------- loss and scores
    def training_loss(self, model, images, targets):
        loss_cfg = self.cfg.train.loss
        if loss_cfg.name != "cross_entropy":
            raise ValueError(
                f"classification supports loss.name 'cross_entropy' (with label_smoothing), got {loss_cfg.name!r}"
            )
        weight = torch.tensor(loss_cfg.class_weights, device=images.device) if loss_cfg.class_weights else None
        return F.cross_entropy(model(images), targets, weight=weight, label_smoothing=loss_cfg.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model, loader, device, native: bool = False) -> EvalResult:
        """Accuracy and macro F1; every class's probability kept for the report (resolution plays no part)."""
        model.eval()
        preds, labels, probs, loss_sum = [], [], [], 0.0
        for images, targets in loader:
            logits = model(images.to(device))
            loss_sum += F.cross_entropy(logits, targets.to(device), reduction="sum").item()
            preds.append(logits.argmax(1).cpu())
            probs.append(F.softmax(logits.float(), 1).cpu())
            labels.append(targets)
        y_pred, y_true = torch.cat(preds).numpy(), torch.cat(labels).numpy()
        result = self._score(y_true, y_pred)
        result.metrics["loss"] = loss_sum / max(len(y_true), 1)
        result.predictions["probs"] = torch.cat(probs).numpy()
        return result

    def _score(self, y_true: np.ndarray, y_pred: np.ndarray) -> EvalResult:
        return score(self.class_names(), y_true, y_pred)

    def dummy_result(self, train, evaluation) -> EvalResult:
        most_frequent = Counter(train.labels).most_common(1)[0][0]
        y_true = np.asarray(evaluation.labels)
        return self._score(y_true, np.full_like(y_true, most_frequent))

    @torch.no_grad()
    def predict_image(self, model, image, normalize, image_id: int) -> Prediction:
        """The class and every class's probability (softmax of the logits)."""
        x = self.predict_transform(normalize)(image).as_subclass(torch.Tensor)[None]
        device = next(model.parameters()).device
        probs = F.softmax(model.eval()(x.to(device)), 1)[0].cpu()
        names = self.class_names()
        k = int(probs.argmax())
        record = {
            "image_id": image_id,
            "class": names[k],
            "score": round(float(probs[k]), 6),
            **{f"prob_{c}": round(float(p), 6) for c, p in zip(names, probs.tolist())},
        }
        return Prediction([record], [names[k]])

    # ---------------------------------------------------------- visualisation
    def draw(self, image, target):
        from cv_models.visualise import caption

        return caption(image, label_text(self.class_names(), target))

    def report(self, results: dict[str, EvalResult], test, out_dir: Path) -> list[Path]:
        """Confusion matrices, and a CSV per model of every test image's true class, predicted class and class
        probabilities (the dummy: probability 1 for its one class), with how to rescore them."""
        return write_report(self.class_names(), results, test, out_dir)


def _zero_head(model: nn.Module, head: str) -> None:
    """The new head on pretrained features starts at zero (every class equally likely). Its own init can be far too
    large for a few classes: timm's EfficientNets draw it from U(+-1/sqrt(num_classes)), logits of std 7 on 6 classes,
    a first epoch's loss of 6.8 where ln 6 = 1.8 is the start of an untrained head."""
    layer = model.get_submodule(head)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


def _head_name(model: nn.Module) -> str:
    """Name of the last Linear layer: the head that is re-fitted to the dataset's classes."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"{type(model).__name__} has no Linear head to fit to the classes")
    return last


def _network(m: Any, n: int) -> nn.Module:
    """One of the project's small nets (cv_models/nets), or timm:<arch> or a torchvision classifier by name
    (cv_models/pretrained.py PROVIDERS), with ``n`` outputs."""
    if m.name in NETS:
        if m.options.kwargs:
            raise ValueError(
                f"model.options.kwargs is for torchvision classifiers; {m.name!r} takes width, depth and dropout"
            )
        return NETS[m.name](num_classes=n, width=m.width, depth=m.depth, dropout=m.dropout)
    provider, arch = split_name(m.name)
    try:
        return provider.classifier(arch, n, m.options.kwargs)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"model.name {m.name!r}: {err}") from None
