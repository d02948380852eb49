"""The segmentation task: what the stages call (cv_models/base.py: CVTask), each method a few lines over the
package's modules: settings.py (the schema), data.py (listing, masks, dataset, mask-aware augmentations),
networks.py (the architectures), validation.py (the validate stage's tables and rules) and report.py (scoring,
pictures, report files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cv_models.augment import AUGMENTATIONS, Augmentation, build_transforms, with_builders
from cv_models.base import Check, CVTask, EvalResult, Prediction, in_order, register_task
from cv_models.data.class_masks import CocoMaskListing, MaskFolderListing, MaskReader
from cv_models.mix.segmentation import build_mixer
from cv_models.seg_losses import get_loss
from cv_models.segmentation import validation
from cv_models.segmentation.data import (
    SegmentationDataset,
    build_mask_reader,
    collate_pairs,
    elastic,
    mask_aware_builders,
    read_listing,
)
from cv_models.segmentation.networks import (
    ARCHITECTURES,
    LogitsOnly,
    architecture,
    load_weights,
    model_outputs,
    to_size,
)
from cv_models.segmentation.report import (
    class_colors,
    confusion,
    most_frequent_class_result,
    mask_overlay,
    per_class_iou,
    prediction_grid,
    confusion_scores,
    write_masks,
)
from cv_models.segmentation.settings import SETTINGS, SegmentationDataOptions
from cv_models.segmentation.tta import tta_logits
from cv_models.settings import AugmentConfig


@register_task
class SegmentationTask(CVTask):
    name = "segmentation"
    primary_metric = "miou"
    settings = SETTINGS
    results_file = "predictions.csv"
    # the shared augmentations and segmentation's own elastic deformation (its builder: segmentation/data.py)
    augmentations = {**AUGMENTATIONS, "elastic": Augmentation("geometric", elastic)}

    # ------------------------------------------------------------------ config
    @property
    def data_options(self) -> SegmentationDataOptions:
        """``data.options``, typed (settings.py)."""
        return self.cfg.data.options

    @property
    def ignore_index(self) -> int:
        return self.cfg.train.loss.ignore_index

    def colors(self) -> list[tuple[int, int, int]]:
        return class_colors(self.data_options.colors, len(self.class_names()))

    def mask_reader(self) -> MaskReader:
        return build_mask_reader(self.data_options, len(self.class_names()), self.ignore_index)

    # ------------------------------------------------------------------ listing
    def _read(self) -> MaskFolderListing | CocoMaskListing:
        """The reader's listing of ``data.format`` (cv_models/data/class_masks.py), read once per task object."""
        if not hasattr(self, "_listing"):
            self._listing = read_listing(self.name, self.cfg.data, self.ignore_index)
        return self._listing

    def _samples(self) -> list[dict]:
        return self._read().rows

    def class_names(self) -> list[str]:
        if self.cfg.data.classes:
            return list(self.cfg.data.classes)
        return self._read().class_names()

    def load_mask(self, row: dict) -> np.ndarray:
        return self._read().read(row, self.class_names, self.ignore_index, self.mask_reader)[0]

    # ------------------------------------------------------------ validation
    def validation_tables(self) -> dict[str, pd.DataFrame]:
        listing = self._read()
        return validation.sample_tables(
            listing, self.class_names(), self.ignore_index, self.mask_reader(), self.cfg.data.path
        )

    def checks(self, tables: dict[str, pd.DataFrame]) -> list[Check]:
        return validation.checks(self.cfg.data, self.data_options, self.class_names(), self.ignore_index)

    def validation_notes(self, tables: dict[str, pd.DataFrame]) -> list[str]:
        return validation.notes(tables, self.cfg.data.color_mode, self._read().orphan_masks)

    def validation_summaries(self, tables: dict[str, pd.DataFrame]) -> dict[str, str]:
        return validation.summaries(tables, self.class_names())

    # ------------------------------------------------------------------ data
    def dataset(self, split: str, transforms) -> SegmentationDataset:
        rows = [r for r in self._samples() if r["split"] == split]
        return SegmentationDataset(rows, self.load_mask, transforms)

    def collate(self, batch: list):
        return collate_pairs(batch)

    def train_transforms(self, augment: AugmentConfig | None, normalize):
        registry = with_builders(self.augmentations, mask_aware_builders(self.ignore_index))
        crop = self.cfg.options.train_crop
        return build_transforms(self.cfg.image_size, augment, normalize, registry=registry, crop=crop)

    def eval_transforms(self, normalize):
        return build_transforms(self.cfg.image_size, None, normalize)

    def batch_mixer(self, augment: AugmentConfig | None):
        return build_mixer(augment, len(self.class_names()), self.ignore_index)

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        m = self.cfg.model
        arch = architecture(m)
        model = arch.build(len(self.class_names()), m)
        return load_weights(model, m, arch, self.load_imagenet)

    def pretrained_name(self) -> str | None:
        arch = ARCHITECTURES.get(self.cfg.model.name)
        return arch.pretrained(self.cfg.model) if arch else None

    def encoder_prefixes(self) -> tuple[str, ...]:
        return ARCHITECTURES[self.cfg.model.name].backbone_prefixes if self.pretrained_name() else ()

    def training_loss(self, model, images, targets):
        loss_fn = get_loss(self.cfg.train.loss.name)
        out, aux = model_outputs(model(images))
        loss = loss_fn(out, targets, self.cfg.train.loss)
        if aux is not None:  # torchvision's auxiliary head, weighted as in its reference scripts
            loss = loss + 0.5 * loss_fn(aux, targets, self.cfg.train.loss)
        return loss

    def export_module(self, model):
        return LogitsOnly(model)

    # ------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model, loader, device, native: bool = False) -> EvalResult:
        """mIoU and friends; ``native``: each image's logits resized to its own size (as :meth:`predict_image`
        does) against its original mask, the predicted masks kept in ``extra["masks"]``; else at the training size."""
        model.eval()
        n = len(self.class_names())
        keep = self.cfg.options.overlay_samples
        cm = torch.zeros(n, n, dtype=torch.long)
        loss_sum, n_pixels, kept, native_masks = 0.0, 0, [], []
        dataset, order = in_order(loader.dataset)
        tta = self.cfg.options.tta if native else "none"  # the evaluate stage's scores; not training's validation
        for images, masks in loader:
            logits = tta_logits(model, images.to(device), tta)
            if len(kept) < keep:  # pictures at the training size: one grid size whatever the images' sizes
                kept += list(logits[: keep - len(kept)].argmax(1).to(torch.uint8).cpu())
            if native:
                pairs = []
                for k in range(len(images)):
                    truth = dataset.mask(order[len(native_masks) + len(pairs)]).long().to(device)[None]
                    pairs.append((to_size(logits[k : k + 1], truth.shape[-2:]), truth))
            else:
                pairs = [(logits, masks.to(device))]
            for scores, truth in pairs:
                loss_sum += F.cross_entropy(scores, truth, ignore_index=self.ignore_index, reduction="sum").item()
                n_pixels += int((truth != self.ignore_index).sum())
                pred = scores.argmax(1)
                cm += confusion(pred, truth, n, self.ignore_index)
                if native:
                    native_masks.append(pred[0].to(torch.uint8).cpu().numpy())
        result = self._score(cm)
        result.metrics["loss"] = loss_sum / max(n_pixels, 1)
        result.predictions = kept
        if native:
            result.extra["masks"] = native_masks  # one HxW class-index array per image, in the dataset's order
        return result

    def _score(self, cm: torch.Tensor) -> EvalResult:
        return confusion_scores(cm, self.class_names())

    def dummy_result(self, train, evaluation) -> EvalResult:
        """Most frequent training class everywhere, scored against the original masks (each image's own size)."""
        return most_frequent_class_result(train, evaluation, self.class_names(), self.ignore_index)

    counted_as = "images containing the class"

    def counted_classes(self) -> list[str]:
        return self.class_names()[1:]  # classes[0] is the background

    @torch.no_grad()
    def predict_image(self, model, image, normalize, image_id: int) -> Prediction:
        """A class-index mask at the image's own resolution: the logits at the training size are resized
        (bilinear) to the image's size, then the most likely class per pixel."""
        x = self.predict_transform(normalize)(image).as_subclass(torch.Tensor)[None]
        device = next(model.parameters()).device
        logits = tta_logits(model.eval(), x.to(device), self.cfg.options.tta)
        mask = to_size(logits, (image.height, image.width)).argmax(1)[0].to(torch.uint8).cpu()
        names = self.class_names()
        counts = torch.bincount(mask.flatten().long(), minlength=len(names))
        record = {
            "image_id": image_id,
            **{f"pixels_{c}": round(float(n) / mask.numel(), 6) for c, n in zip(names, counts.tolist())},
        }
        present = [c for c, n in zip(names[1:], counts[1:].tolist()) if n > 0]  # classes[0] is the background
        rgb = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
        return Prediction([record], present, mask=mask.numpy(), overlay=self.overlay(rgb, mask)[0])

    # ---------------------------------------------------------- visualisation
    def overlay(self, image, target) -> tuple[torch.Tensor, str]:
        """uint8 picture of the image with the mask's classes in their colours (ignored pixels white)."""
        return mask_overlay(image, target, self.colors(), self.ignore_index)

    def draw(self, image, target):
        from cv_models.visualise import caption

        picture, text = self.overlay(image, target)
        return caption(picture.float() / 255, text)

    def report(self, results: dict[str, EvalResult], test, out_dir: Path) -> list[Path]:
        """Test images with the true masks and each model's predicted masks; per-class IoU table; the predicted
        masks at the images' own resolution (report.py: write_masks)."""
        plain = self.dataset("test", self.eval_transforms(None))
        files = prediction_grid(results, plain, self.overlay, out_dir) + [per_class_iou(results, out_dir)]
        return files + write_masks(results, test, out_dir, self.class_names(), self.ignore_index)
