"""The detection task: what the pipeline's stages call (cv_models/base.py's interface), each method a short step
over the package's parts: settings, data, transforms, validation, model, scoring and report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from cv_models.augment import AUGMENTATIONS, BATCH, Augmentation, build_transforms
from cv_models.base import Check, CVTask, EvalResult, Prediction, register_task
from cv_models.data.annotations import AnnotationTables
from cv_models.data.registry import reader
from cv_models.detection import transforms as box_transforms
from cv_models.detection import validation
from cv_models.detection.data import DetectionDataset, collate, split_records
from cv_models.detection.model import (
    DetectionOutputs,
    anchor_fit_line,
    anchor_layout,
    fitted_anchors,
    freeze_parts,
    load_weights,
    normalisation_stats,
    torchvision_detector,
    train_box_sizes,
)
from cv_models.detection.report import draw_boxes, write_report
from cv_models.detection.scoring import coco_evaluation, coco_results, dummy_results, model_results
from cv_models.detection.settings import SETTINGS, DetectionModelOptions
from cv_models.detection.tta import tta_detections
from cv_models.pretrained import input_convention
from cv_models.settings import AugmentConfig


@register_task
class DetectionTask(CVTask):
    name = "detection"
    primary_metric = "map50"
    settings = SETTINGS
    augmentations = {**AUGMENTATIONS, "mosaic": Augmentation(BATCH)}
    export_outputs = ("boxes", "labels", "scores")
    export_batched = False
    normalizes_inside = True

    # ------------------------------------------------------------------ data
    def _policy(self) -> str:
        return self.cfg.data.options.invalid_boxes

    def tables(self) -> AnnotationTables:
        if not hasattr(self, "_tables"):  # read and probe once per task object (cv_models/data/boxes.py)
            self._tables = reader(self.name, self.cfg.data.format)(self.cfg.data)
        return self._tables

    def class_names(self) -> list[str]:
        if self.cfg.data.options.keep_classes:  # data.classes then names the ids of a YOLO set, not the classes trained
            return self.tables().categories
        return list(self.cfg.data.classes) if self.cfg.data.classes else self.tables().categories

    def validation_tables(self) -> dict[str, pd.DataFrame]:
        return validation.tables(self.tables())

    def checks(self, tables: dict[str, pd.DataFrame]) -> list[Check]:
        return validation.checks(self.class_names(), self._policy())

    def validation_notes(self, tables: dict[str, pd.DataFrame]) -> list[str]:
        return validation.notes(tables, self.tables().notes, self._policy())

    def validation_summaries(self, tables: dict[str, pd.DataFrame]) -> dict[str, str]:
        out = validation.summaries(tables)
        from cv_models.sizing import describe

        out["Settings sized from the data"] = describe(self.most_objects(), self.cfg.model.options)
        return out

    def object_boxes(self, split: str) -> list[dict]:
        return [{**r, "boxes": r["boxes"].tolist(), "labels": r["labels"].tolist()} for r in self.records(split)]

    def records(self, split: str) -> list[dict]:
        """The split's usable images with their valid boxes (invalid ones are dropped: with
        invalid_boxes=fail validation has already stopped the run if there were any)."""
        key = ("_records", split)
        if key not in self.__dict__:
            self.__dict__[key] = split_records(self.tables(), self.class_names(), split)
        return self.__dict__[key]

    def dataset(self, split: str, transforms) -> DetectionDataset:
        return DetectionDataset(self.records(split), self.class_names(), transforms, size=self.cfg.image_hw)

    def collate(self, batch):
        return collate(batch)

    def subset(self, dataset: DetectionDataset, indices: list[int]) -> DetectionDataset:
        return type(dataset)([dataset.records[i] for i in indices], dataset.class_names, dataset.transforms)

    # ------------------------------------------------------------ transforms
    def train_transforms(self, augment: AugmentConfig | None, normalize):
        # ``normalize`` is not applied: the detector normalises inside (see build_model)
        return box_transforms.train_transforms(self.cfg.image_hw, augment, self.augmentations)

    def eval_transforms(self, normalize):
        return build_transforms(self.cfg.image_size, None, None)  # evaluation reads the boxes from the records

    def batch_mixer(self, augment: AugmentConfig | None):
        return box_transforms.batch_mixer(augment)

    # ------------------------------------------------------------------ model
    def input_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std the detector normalises with (from the normstats stage), or the input
        convention of its pretrained backbone's weights (model.weights: imagenet)."""
        if self.uses_imagenet_convention():
            c = input_convention(self.pretrained_name())
            return list(c.mean), list(c.std)
        # the normstats stage's output (tasks.paths.outputs layout; cv_models does not import tasks)
        path = Path(self.normstats_dir or Path("outputs") / self.name / "normstats") / "stats.json"
        return normalisation_stats(self.cfg.normalization, path)

    def most_objects(self) -> int:
        """The largest number of (valid) objects in one training image: sizes the ``auto`` settings."""
        return max((len(r["boxes"]) for r in self.records("train")), default=0)

    def model_options(self) -> DetectionModelOptions:
        """A copy of ``model.options`` (sized: cv_models/sizing.py) with ``anchor_size: auto`` / ``aspect_ratios: auto``
        replaced by anchors sized to the training boxes at the training size (the same split gives the same anchors
        at evaluation)."""
        from cv_models.sizing import sized_options

        o, _ = sized_options(self.cfg.model.options, self.most_objects())
        auto = [k for k in ("anchor_size", "aspect_ratios") if getattr(o, k) == "auto"]
        if not auto:
            return o
        levels, scales = anchor_layout(self.cfg.model.name, o, auto)
        sizes = train_box_sizes(self.records("train"), self.cfg.image_hw)
        fitted = fitted_anchors(sizes, levels, scales)
        o = o.model_copy(update={k: fitted[k] for k in auto})
        if not getattr(self, "_anchors_reported", False):  # once per task object (evaluation rebuilds the model)
            print(anchor_fit_line(self.name, self.cfg.image_hw, o, fitted, sizes, levels, scales))
            self._anchors_reported = True
        return o

    def inference_config(self):
        """The class list, and anchors sized to the data ('auto') replaced by the sizes they resolved to."""
        cfg = super().inference_config()
        return cfg.model_copy(update={"model": cfg.model.model_copy(update={"options": self.model_options()})})

    def build_model(self) -> nn.Module:
        from cv_models.nets.detectors import DETECTORS, build_detector

        m, t = self.cfg.model, self.cfg.train
        if t.num_threads:  # the detectors thrash with more threads than free cores
            torch.set_num_threads(t.num_threads)
        mean, std = self.input_stats()
        n = len(self.class_names()) + 1  # + background
        size = self.cfg.image_hw
        if m.name in DETECTORS:
            model = build_detector(m.name, n, size, mean, std, m.width, self.model_options())
        else:  # any torchvision detection builder, e.g. fasterrcnn_mobilenet_v3_large_fpn
            model = torchvision_detector(m, n, size, mean, std)
        load_weights(model, m, self.load_imagenet)
        freeze_parts(model, m)
        return model

    def pretrained_name(self) -> str | None:
        from cv_models.nets.detectors import DETECTORS, backbone_network

        # the registry's detectors take model.options.backbone; torchvision's built-by-name ones have their own
        return backbone_network(self.cfg.model.options.backbone) if self.cfg.model.name in DETECTORS else None

    def encoder_prefixes(self) -> tuple[str, ...]:
        return ("backbone.body.",) if self.pretrained_name() else ()

    def export_module(self, model):
        return DetectionOutputs(model, self.export_outputs)

    # ------------------------------------------------------------ training and scoring
    def training_loss(self, model, images, targets):
        losses = model(images, targets)
        return sum(losses.values())

    @torch.no_grad()
    def evaluate(self, model, loader, device, native: bool = False) -> EvalResult:
        """COCO mAP with every box mapped back to its image's original pixels, always (``native`` or not); the
        evaluate stage's (``native``) with options.tta."""
        tta = self.cfg.options.tta if native else "none"
        return self.score(loader.dataset, model_results(model, loader, device, tta))

    def score(self, dataset: DetectionDataset, results: list[dict]) -> EvalResult:
        return coco_evaluation(dataset.coco_ground_truth(), results, self.class_names())

    def dummy_result(self, train, evaluation) -> EvalResult:
        """One centred box of the training boxes' mean relative size and the most frequent class, per image."""
        return self.score(evaluation, dummy_results(train.records, evaluation.records))

    @torch.no_grad()
    def predict_image(self, model, image, normalize, image_id: int) -> Prediction:
        """COCO results of one image, boxes in the image's own pixels (as the evaluation exports them)."""
        h, w = self.cfg.image_hw
        x = self.predict_transform(None)(image.resize((w, h), Image.BILINEAR) if image.size != (w, h) else image)
        device = next(model.parameters()).device
        out = tta_detections(model.eval(), [x.as_subclass(torch.Tensor).to(device)], self.cfg.options.tta)[0]
        sx, sy = image.width / x.shape[-1], image.height / x.shape[-2]
        boxes = out["boxes"].cpu() * torch.tensor([sx, sy, sx, sy])
        names = self.class_names()
        records = coco_results(image_id, boxes, out["scores"].cpu(), out["labels"].cpu())
        for r in records:
            r["category"] = names[r["category_id"] - 1]
        threshold = self.cfg.options.draw_score_threshold
        objects = [r["category"] for r in records if r["score"] >= threshold]
        rgb = v2.functional.to_image(image).float() / 255
        drawn = {"boxes": boxes, "labels": out["labels"].cpu(), "scores": out["scores"].cpu()}
        return Prediction(records, objects, overlay=self.draw(rgb, drawn, min_size=0, score_threshold=threshold))

    # ---------------------------------------------------------- visualisation
    def display_image(self, image, normalize):
        return image  # never normalised by the transforms

    def draw(self, image, target, min_size: int = 192, score_threshold: float = 0.0):
        """Boxes with class names (and mixing weight or score below 1) on the image, upscaled for legibility."""
        return draw_boxes(image, target, self.class_names(), min_size, score_threshold)

    def report(self, results: dict[str, EvalResult], test, out_dir: Path) -> list[Path]:
        """COCO ground truth and results JSON per model in the original pixels (RECOMPUTE.md), predictions drawn."""
        o = self.cfg.options
        return write_report(results, test, out_dir, self.draw, o.report_images, o.draw_score_threshold)
