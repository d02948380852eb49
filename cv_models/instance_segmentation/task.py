"""The instance segmentation task: what the pipeline stages call (cv_models/base.py's interface), each method
handing the work to the package's modules: settings, data, validation, scoring and report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from cv_models.augment import AUGMENTATIONS, BATCH, Augmentation, build_transforms, with_builders
from cv_models.base import Check, CVTask, EvalResult, Prediction, register_task
from cv_models.data.coco import no_ground_truth_notes
from cv_models.instance_segmentation import data, scoring, validation
from cv_models.instance_segmentation import report as reporting
from cv_models.instance_segmentation.data import InstanceCutout, InstanceDataset, TidyInstances
from cv_models.instance_segmentation.settings import SETTINGS
from cv_models.mix.instances import InstanceBatchMixer, MixOp
from cv_models.nets.detectors import backbone_network, pretrained_trunk
from cv_models.nets.mask_rcnn import build_mask_rcnn
from cv_models.settings import AugmentConfig
from cv_models.weights import freeze


@register_task
class InstanceSegmentationTask(CVTask):
    name = "instance_segmentation"
    primary_metric = "mask_map50"
    settings = SETTINGS
    augmentations = {**AUGMENTATIONS, "copy_paste": Augmentation(BATCH)}
    export_outputs = ("boxes", "labels", "scores", "masks")  # masks: N x 1 x H x W probabilities
    export_batched = False

    # ------------------------------------------------------------------ data
    def _tables(self) -> data.Tables:
        """Images and annotations tables, read once: the format's reader (cv_models/data/instances.py) plus mask facts."""
        if not hasattr(self, "_cached_tables"):
            self._cached_tables, self._reader_notes = data.read_tables(self.name, self.cfg.data)
        return self._cached_tables

    def class_names(self) -> list[str]:
        if self.cfg.data.options.keep_classes:  # data.classes then names the ids of a YOLO set, not the classes trained
            return list(self._tables()[2])
        if self.cfg.data.classes:
            return list(self.cfg.data.classes)
        return list(self._tables()[2])

    def validation_tables(self) -> dict[str, pd.DataFrame]:
        images, anns, _ = self._tables()
        return validation.validation_tables(images, anns)

    def checks(self, tables: dict[str, pd.DataFrame]) -> list[Check]:
        return validation.checks(tables, self.class_names())

    def validation_notes(self, tables: dict[str, pd.DataFrame]) -> list[str]:
        return validation.notes(tables, getattr(self, "_reader_notes", []))

    def validation_summaries(self, tables: dict[str, pd.DataFrame]) -> dict[str, str]:
        from cv_models.sizing import describe

        return validation.summaries(tables, lambda: describe(self.most_objects(), self.cfg.model.options))

    def _split_tables(self, split: str):
        """The split's decodable images, the label of each kept class, and the split's usable annotations."""
        return data.split_tables(self._tables(), self.class_names(), split)

    def _records(self, split: str) -> list[dict]:
        return data.records(*self._split_tables(split))

    def object_boxes(self, split: str) -> list[dict]:
        return data.object_boxes(*self._split_tables(split))

    def dataset(self, split: str, transforms) -> InstanceDataset:
        return InstanceDataset(self._records(split), transforms)

    def collate(self, batch: list):
        return data.collate(batch)

    # ------------------------------------------------------------ transforms
    def _tidy(self) -> TidyInstances:
        o = self.cfg.augment.options
        return TidyInstances(o.min_area, o.min_visible)

    def train_transforms(self, augment: AugmentConfig | None, normalize):
        registry = with_builders(self.augmentations, {"cutout": lambda c, size: InstanceCutout(c.p, tuple(c.scale))})
        return build_transforms(self.cfg.image_size, augment, normalize, registry=registry, tail=[self._tidy()])

    def eval_transforms(self, normalize):
        return build_transforms(self.cfg.image_size, None, normalize, tail=[TidyInstances(1, 0.0)])

    def batch_mixer(self, augment: AugmentConfig | None):
        """Hand-written MixUp, CutMix and copy-paste (``augment.copy_paste``) for instances."""
        if augment is None:
            return None
        ops = [
            MixOp(name, c.p, c.alpha) for name, c in (("mixup", augment.mixup), ("cutmix", augment.cutmix)) if c.enabled
        ]
        if augment.copy_paste.enabled:
            ops.append(MixOp("copy_paste", augment.copy_paste.p, 1.0))
        if not ops:
            return None
        return InstanceBatchMixer(ops, augment.options.min_area, augment.options.min_visible)

    # ------------------------------------------------------------------ model
    def most_objects(self) -> int:
        """The largest number of instances in one training image: sizes the ``auto`` model settings."""
        return data.most_objects(self._tables()[1])

    def build_model(self) -> nn.Module:
        from cv_models.sizing import sized_options

        m = self.cfg.model
        options, _ = sized_options(m.options, self.most_objects())
        imagenet = m.weights == "imagenet"  # into the backbone's trunk; else weights of the whole model
        model = build_mask_rcnn(
            m.name, len(self.class_names()) + 1, self.cfg.image_hw, m.width, options, "none" if imagenet else m.weights
        )
        if imagenet:
            self.load_imagenet(pretrained_trunk(model.backbone))
        if m.freeze_backbone:
            for p in model.backbone.body.parameters():
                p.requires_grad = False
        freeze(model, m.frozen_layers)
        return model

    def pretrained_name(self) -> str | None:
        # the light maskrcnn takes model.options.backbone; torchvision's ResNet-50 ones their own whole-model weights
        return backbone_network(self.cfg.model.options.backbone) if self.cfg.model.name == "maskrcnn" else None

    def encoder_prefixes(self) -> tuple[str, ...]:
        return ("backbone.body.",) if self.pretrained_name() else ()

    def training_loss(self, model, images, targets):
        losses = model(list(images), [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets])
        return sum(losses.values())

    def categories(self) -> list[dict]:
        return [{"id": k + 1, "name": n} for k, n in enumerate(self.class_names())]

    def native_ground_truth(self, dataset: InstanceDataset, indices: list[int]) -> dict:
        """COCO ground truth of the records at ``indices``, at each image's own resolution."""
        return scoring.native_ground_truth(dataset, indices, self.categories())

    def predict(self, model, loader, device, native: bool = False):
        """Ground truth and model results as COCO dicts: at each image's own resolution (``native``, as
        :meth:`predict_image` maps them) or at the training size (the per-epoch validation, cheaper)."""
        return scoring.predict(model, loader, device, native, self.categories())

    def export_module(self, model):
        from cv_models.detection import DetectionOutputs

        return DetectionOutputs(model, self.export_outputs)

    def predict_transform(self, normalize):
        return build_transforms(self.cfg.image_size, None, normalize)  # the evaluation's, without the targets' tidying

    @torch.no_grad()
    def predict_image(self, model, image, normalize, image_id: int) -> Prediction:
        """COCO results with compressed-RLE masks at the image's own resolution: mask probabilities at the
        training size are resized (bilinear) to the image's size, then thresholded at 0.5."""
        x = self.predict_transform(normalize)(image).as_subclass(torch.Tensor)
        device = next(model.parameters()).device
        out = {k: v.cpu() for k, v in model.eval()([x.to(device)])[0].items()}
        out = scoring.to_image_size(out, tuple(x.shape[-2:]), (image.height, image.width))
        names = self.class_names()
        records = scoring.result_entries(out, image_id)
        for r in records:
            r["category"] = names[r["category_id"] - 1]
        threshold = self.cfg.options.draw_score_threshold
        rgb = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
        overlay = self.draw(rgb, out, score_threshold=threshold, min_size=0)
        return Prediction(records, [r["category"] for r in records if r["score"] >= threshold], overlay=overlay)

    def _result(self, gt: dict, results: list[dict]) -> EvalResult:
        metrics, per_class = scoring.coco_scores(gt, results, self.class_names())
        return EvalResult(
            metrics=metrics,
            predictions=results,
            per_class=per_class,
            extra={"coco_gt": gt, "notes": no_ground_truth_notes(per_class, "gt_instances")},
        )

    def evaluate(self, model, loader, device, native: bool = False) -> EvalResult:
        return self._result(*self.predict(model, loader, device, native))

    def dummy_result(self, train: Dataset, evaluation: Dataset) -> EvalResult:
        """One box-shaped instance per image: the most frequent training class, centred, of the mean
        training instance size (relative to the image); scored at each image's own resolution."""
        images, anns, _ = self._tables()
        shape = scoring.dummy_shape(images, anns, self.class_names())
        gt = self.native_ground_truth(evaluation, list(range(len(evaluation))))
        return self._result(gt, scoring.dummy_results(gt, *shape))

    # ---------------------------------------------------------- visualisation
    def draw(self, image: torch.Tensor, target, score_threshold: float = 0.5, min_size: int = 192) -> torch.Tensor:
        """Masks filled in per-class colours, boxes and class names; predictions below the score threshold
        hidden; small images enlarged (nearest) to ``min_size`` so the names stay legible."""
        return reporting.draw(image, target, self.class_names, score_threshold, min_size)

    def report(self, results: dict[str, EvalResult], test: Dataset, out_dir: Path) -> list[Path]:
        """COCO ground truth and results JSON per model at the images' own resolution, how to rescore them,
        and predicted masks drawn on test images."""
        return reporting.write_report(results, test, out_dir, self.cfg.options.report_images, self.draw)
