"""Image classification: ImageFolder data, small CNN or torchvision classifiers, accuracy and F1."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from cv_models.augment import build_transforms
from cv_models.base import Check, CVTask, DataError, EvalResult, Prediction, never_predicted, register_task
from cv_models.data.imagefolder import read_imagefolder  # noqa: F401 (registers the imagefolder reader)
from cv_models.data.registry import reader
from cv_models.data.probe import IMAGE_SUFFIXES, load_rgb, probe_image
from cv_models.nets import NETS
from cv_models.pretrained import split_name
from cv_models.weights import freeze, load_into, read_checkpoint, torchvision_state_dict
from cv_models.settings import AugmentConfig, Strict, size_hw, task_settings

DUPLICATE_POLICIES = ("fail", "drop")
REQUIRED_SPLITS = ("train", "val")  # every class must appear here; test gaps are reported


class ImageFolderDataset(Dataset):
    def __init__(self, samples: list[dict], class_names: list[str], transforms):
        self.samples = samples
        self.class_to_idx = {c: i for i, c in enumerate(class_names)}
        self.transforms = transforms
        self.labels = [self.class_to_idx[s["label"]] for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        image = load_rgb(self.samples[i]["path"])
        if self.transforms is not None:
            image = self.transforms(image)
        return image, self.labels[i]


class PlainTransform:
    """Resize, to float in [0, 1], normalise: what ``build_transforms`` does without augmentations, in
    one call. A lone image needs none of transforms v2's joint dispatch, whose per-call cost is a
    measurable share of a small classifier's step (benchmarks/bench_train_step.py)."""

    def __init__(self, size: int, normalize):
        self.size, self.normalize = size, normalize
        self.resize = PilResize(size)

    def __call__(self, image: Image.Image) -> tv_tensors.Image:
        image = self.resize(image)
        x = tv_tensors.Image(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255))
        return self.normalize.transform(x, {}) if self.normalize is not None else x

    def split(self):
        """``(prefix, rest)`` for data.cache: the resize, then this (which finds the image already at size)."""
        return self.resize, _ImageOnly(self)


class PilResize:
    """The resize of :class:`PlainTransform` alone (what data.cache keeps)."""

    def __init__(self, size: int | tuple[int, int]):
        h, w = size_hw(size)
        self.size = (w, h)  # PIL's (width, height)

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.size == self.size:
            return image
        return image.resize(self.size, Image.BILINEAR)  # as v2.Resize does on PIL images

    def __repr__(self) -> str:
        return f"PilResize({self.size}, bilinear)"


class _ImageOnly:
    """``(image, label) -> (transform(image), label)``: a cached sample through the image's transform."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, label):
        return self.transform(image), label


class ClassificationDataOptions(Strict):
    """``data.options`` of classification (format imagefolder)."""

    # byte-identical files under two classes: fail (a validation rule fails) | drop (every copy left out, named in the notes)
    conflicting_duplicates: Literal["fail", "drop"] = "fail"


class ClassificationModelOptions(Strict):
    """``model.options`` of classification."""

    # extra keyword arguments of a torchvision classifier's builder (e.g. zero_init_residual: true for a resnet);
    # the builder rejects one it does not take when the model is built
    kwargs: dict[str, Any] = {}


@register_task
class ClassificationTask(CVTask):
    name = "classification"
    primary_metric = "accuracy"
    settings = task_settings(
        "Classification", data_options=ClassificationDataOptions, model_options=ClassificationModelOptions
    )
    results_file = "predictions.csv"

    # ------------------------------------------------------------------ data
    def _samples(self) -> tuple[list[dict], list[str]]:
        if not hasattr(self, "_listing"):  # the folder walk is done once per task object
            d = self.cfg.data
            rows, classes = reader(self.name, d.format)(d)
            self._listing = (self._handle_duplicates(rows), classes)
        return self._listing

    def _duplicate_policy(self) -> str:
        policy = self.cfg.data.options.conflicting_duplicates
        if policy not in DUPLICATE_POLICIES:
            raise DataError(f"data.options.conflicting_duplicates must be one of {DUPLICATE_POLICIES}, got {policy!r}")
        return policy

    def _handle_duplicates(self, rows: list[dict]) -> list[dict]:
        """Byte-identical files: under split_from=seed each group goes to one split (no leak between splits);
        a group filed under two classes is a labelling error: data.options.conflicting_duplicates decides
        (fail: the validation rule fails; drop: every copy is left out and named in the notes)."""
        import hashlib

        policy = self._duplicate_policy()
        groups: dict[str, list[dict]] = {}
        for r in rows:
            try:
                r["sha256"] = hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest()
            except OSError:
                r["sha256"] = f"unreadable:{r['path']}"
            groups.setdefault(r["sha256"], []).append(r)
        self._dropped_duplicates = []
        out = []
        for group in groups.values():
            if len(group) > 1 and self.cfg.data.split_from == "seed":
                for r in group[1:]:
                    r["split"] = group[0]["split"]
            if len({r["label"] for r in group}) > 1 and policy == "drop":
                self._dropped_duplicates.append(" == ".join(f"{r['path']} ({r['label']})" for r in group))
                continue
            out += group
        order = {r["path"]: k for k, r in enumerate(rows)}
        return sorted(out, key=lambda r: order[r["path"]])

    def class_names(self) -> list[str]:
        if self.cfg.data.classes:
            return list(self.cfg.data.classes)
        return self._samples()[1]

    def validation_tables(self) -> dict[str, pd.DataFrame]:
        rows, folders = self._samples()
        classes = self.cfg.data.classes or folders
        table = (
            pd.DataFrame([{**r, **probe_image(Path(r["path"]))} for r in rows])
            if rows
            else pd.DataFrame(
                columns=[
                    "path",
                    "split",
                    "label",
                    "bytes",
                    "sha256",
                    "width",
                    "height",
                    "channels",
                    "mode",
                    "decodes",
                    "error",
                ]
            )
        )
        table["suffix_is_image"] = table["path"].map(lambda p: Path(p).suffix.lower() in IMAGE_SUFFIXES)
        splits_per_hash = table.groupby("sha256")["split"].nunique() if len(table) else pd.Series(dtype=int)
        table["duplicate_in_other_split"] = table["sha256"].map(splits_per_hash).fillna(0).gt(1)
        labels_per_hash = table.groupby("sha256")["label"].nunique() if len(table) else pd.Series(dtype=int)
        table["duplicate_with_other_label"] = table["sha256"].map(labels_per_hash).fillna(0).gt(1)
        decoded = table[table["decodes"]] if len(table) else table
        coverage = pd.DataFrame(
            [
                {
                    "class_split": f"class '{c}' in split '{s}'",
                    "label": c,
                    "split": s,
                    "count": int(((decoded["label"] == c) & (decoded["split"] == s)).sum()) if len(decoded) else 0,
                }
                for c in sorted(set(classes) | set(folders))
                for s in ("train", "val", "test")
            ]
        )
        return {"samples": table, "coverage": coverage}

    def checks(self, tables: dict[str, pd.DataFrame]) -> list[Check]:
        import great_expectations as gx

        d = self.cfg.data
        classes = d.classes or sorted(tables["samples"]["label"].unique())
        # the size rules read the header's size, so a decompression bomb (refused before decoding) is named by them too
        out = [
            Check(
                "samples",
                "every file decodes as an image",
                gx.expectations.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True]),
            ),
            Check(
                "samples",
                f"image width within [{d.min_size}, {d.max_size}]",
                gx.expectations.ExpectColumnValuesToBeBetween(
                    column="width",
                    min_value=d.min_size,
                    max_value=d.max_size,
                    row_condition="width > 0",
                    condition_parser="pandas",
                ),
            ),
            Check(
                "samples",
                f"image height within [{d.min_size}, {d.max_size}]",
                gx.expectations.ExpectColumnValuesToBeBetween(
                    column="height",
                    min_value=d.min_size,
                    max_value=d.max_size,
                    row_condition="width > 0",
                    condition_parser="pandas",
                ),
            ),
            Check(
                "samples",
                f"label in the declared classes {list(classes)}",
                gx.expectations.ExpectColumnValuesToBeInSet(column="label", value_set=list(classes)),
            ),
            Check(
                "samples",
                "no identical file in two splits",
                gx.expectations.ExpectColumnValuesToBeInSet(column="duplicate_in_other_split", value_set=[False]),
            ),
            Check(
                "samples",
                "no identical image filed under two different classes (set "
                "data.options.conflicting_duplicates: drop to leave such files out)",
                gx.expectations.ExpectColumnValuesToBeInSet(column="duplicate_with_other_label", value_set=[False]),
            ),
            Check(
                "coverage",
                "every class present in train and val (an empty class folder breaks this)",
                gx.expectations.ExpectColumnValuesToBeBetween(
                    column="count", min_value=1, row_condition='split != "test"', condition_parser="pandas"
                ),
                key_column="class_split",
            ),
        ]
        if d.color_mode == "reject":
            out.append(
                Check(
                    "samples",
                    "image is RGB (grayscale, palette and RGBA are rejected: data.color_mode=reject)",
                    gx.expectations.ExpectColumnValuesToBeInSet(
                        column="mode", value_set=["RGB"], row_condition="decodes == True", condition_parser="pandas"
                    ),
                )
            )
        return out

    def validation_notes(self, tables: dict[str, pd.DataFrame]) -> list[str]:
        s, notes = tables["samples"], []
        if len(s):
            odd = s[s["decodes"] & (s["mode"] != "RGB")]
            if len(odd) and self.cfg.data.color_mode == "convert":
                notes += [
                    f"{p}: mode {m} converted to RGB (data.color_mode=convert)"
                    for p, m in zip(odd["path"], odd["mode"])
                ]
        notes += [
            f"identical files under different classes, left out (data.options.conflicting_duplicates=drop): {g}"
            for g in getattr(self, "_dropped_duplicates", [])
        ]
        cov = tables["coverage"]
        notes += [
            f"{r.class_split}: no images (test metrics for this class will be missing)"
            for r in cov[(cov["split"] == "test") & (cov["count"] == 0)].itertuples()
        ]
        return notes

    def dataset(self, split: str, transforms) -> ImageFolderDataset:
        rows, _ = self._samples()
        return ImageFolderDataset([r for r in rows if r["split"] == split], self.class_names(), transforms)

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
        n = len(self.class_names())
        mixers, probs = [], []
        if augment.mixup.enabled:
            mixers.append(v2.MixUp(alpha=augment.mixup.alpha, num_classes=n))
            probs.append(augment.mixup.p)
        if augment.cutmix.enabled:
            mixers.append(v2.CutMix(alpha=augment.cutmix.alpha, num_classes=n))
            probs.append(augment.cutmix.p)
        if not mixers:
            return None

        def mix(images, labels):
            # one draw per batch: pick a mixer in proportion to its p, apply it with prob max(p)
            if torch.rand(()) >= max(probs):
                return images, labels
            k = int(torch.multinomial(torch.tensor(probs), 1))
            return mixers[k](images, labels)

        return mix

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        m = self.cfg.model
        n = len(self.class_names())
        if m.name in NETS:
            if m.options.kwargs:
                raise ValueError(
                    f"model.options.kwargs is for torchvision classifiers; {m.name!r} takes width, depth and dropout"
                )
            model = NETS[m.name](num_classes=n, width=m.width, depth=m.depth, dropout=m.dropout)
        else:  # timm:<arch> or a torchvision classifier by name (cv_models/pretrained.py PROVIDERS)
            provider, arch = split_name(m.name)
            try:
                model = provider.classifier(arch, n, m.options.kwargs)
            except (ValueError, RuntimeError) as err:
                raise ValueError(f"model.name {m.name!r}: {err}") from None
        head = self._head = _head_name(model)
        if m.weights == "imagenet":
            self.load_imagenet(model, head_prefixes=(head + ".",))
            _zero_head(model, head)
        elif m.weights.startswith("torchvision:"):
            state = torchvision_state_dict(m.name, m.weights.split(":", 1)[1])
            load_into(model, state, m.weights, head_prefixes=(head + ".",))
        elif m.weights != "none":
            load_into(model, read_checkpoint(m.weights), m.weights, head_prefixes=(head + ".",))
        if m.freeze_backbone:
            for name, p in model.named_parameters():
                p.requires_grad = name.startswith(head + ".")
        freeze(model, m.frozen_layers)
        return model

    def pretrained_name(self) -> str | None:
        return None if self.cfg.model.name in NETS else self.cfg.model.name

    def is_encoder(self, parameter: str) -> bool:
        """Every layer but the head (the last Linear layer, found when the model is built)."""
        return self.pretrained_name() is not None and not parameter.startswith(getattr(self, "_head", "") + ".")

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

    def sample_labels(self, dataset) -> list[int]:
        return dataset.labels

    counted_as = "images"  # one predicted class per image

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

    def _score(self, y_true: np.ndarray, y_pred: np.ndarray) -> EvalResult:
        """Accuracy, per-class precision / recall / F1 and the confusion matrix (rows: true class).

        Computed from the confusion matrix directly: it runs every epoch on the validation split,
        where a general-purpose metrics library's input checks cost more than the arithmetic."""
        names = self.class_names()
        n = len(names)
        cm = np.bincount(y_true.astype(np.int64) * n + y_pred.astype(np.int64), minlength=n * n).reshape(n, n)
        tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
            r = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
            f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)
        per_class = pd.DataFrame({"class": names, "precision": p, "recall": r, "f1": f, "support": support})
        metrics = {
            "accuracy": float(tp.sum() / max(cm.sum(), 1)),
            "macro_f1": float(f.mean()),
            "predicted_classes": int((predicted > 0).sum()),  # 1: the model has collapsed to one class
            **{f"f1/{c}": float(v) for c, v in zip(names, f)},
            **never_predicted(names, support.tolist(), predicted.tolist()),
        }
        return EvalResult(
            metrics,
            predictions={"y_true": y_true, "y_pred": y_pred},
            per_class=per_class,
            extra={"confusion_matrix": cm},
        )

    def dummy_result(self, train, evaluation) -> EvalResult:
        most_frequent = Counter(train.labels).most_common(1)[0][0]
        y_true = np.asarray(evaluation.labels)
        return self._score(y_true, np.full_like(y_true, most_frequent))

    # ---------------------------------------------------------- visualisation
    def draw(self, image, target):
        from cv_models.visualise import caption

        names = self.class_names()
        if isinstance(target, torch.Tensor) and target.ndim == 1:  # soft label after MixUp / CutMix
            top = target.topk(min(2, len(names)))
            text = " + ".join(
                f"{names[i]} {w:.2f}" for w, i in zip(top.values.tolist(), top.indices.tolist()) if w > 0.01
            )
        else:
            text = names[int(target)]
        return caption(image, text)

    def report(self, results: dict[str, EvalResult], test, out_dir: Path) -> list[Path]:
        """Confusion matrices, and a CSV per model of every test image's true class, predicted class and class
        probabilities (the dummy: probability 1 for its one class), with how to rescore them."""
        from cv_models.visualise import confusion_matrix_figure

        names = self.class_names()
        files = []
        for model_name, res in results.items():
            y_true, y_pred = res.predictions["y_true"], res.predictions["y_pred"]
            probs = res.predictions.get("probs", np.eye(len(names))[y_pred])
            table = pd.DataFrame(
                {
                    "file": [s["path"] for s in test.samples],
                    "true_class": [names[k] for k in y_true],
                    "predicted_class": [names[k] for k in y_pred],
                }
            )
            table[[f"prob_{c}" for c in names]] = np.round(probs, 6)
            files.append(out_dir / f"predictions_{model_name}.csv")
            table.to_csv(files[-1], index=False)
        (out_dir / "RECOMPUTE.md").write_text(
            "# Rescoring the test predictions\n\n`predictions_<model>.csv`: one row per test image (file, true class, "
            "predicted class, each class's probability). With scikit-learn:\n\n```python\nimport pandas as pd\n"
            "from sklearn.metrics import accuracy_score, f1_score\n\ndf = pd.read_csv('predictions_augmented.csv')\n"
            "print('accuracy', accuracy_score(df.true_class, df.predicted_class))\n"
            f"print('macro_f1', f1_score(df.true_class, df.predicted_class, labels={names!r}, average='macro', "
            "zero_division=0))\n```\n\nThe macro F1 averages over every declared class (one absent from both columns "
            "counts 0), as metrics.json does.\n"
        )
        files.append(out_dir / "RECOMPUTE.md")
        for model_name, res in results.items():
            if "confusion_matrix" in res.extra:
                path = out_dir / f"confusion_matrix_{model_name}.png"
                confusion_matrix_figure(res.extra["confusion_matrix"], self.class_names(), f"{model_name}: test", path)
                files.append(path)
        return files


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
