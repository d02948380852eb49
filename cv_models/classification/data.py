"""Classification's data: the folder listing with its duplicate handling, the dataset of one split, the plain
(unaugmented) transform and the MixUp / CutMix batch mixer."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from cv_models.base import DataError
from cv_models.classification.settings import DUPLICATE_POLICIES
from cv_models.data.imagefolder import read_imagefolder  # noqa: F401 (registers the imagefolder reader)
from cv_models.data.probe import load_rgb
from cv_models.data.registry import reader
from cv_models.settings import AugmentConfig, size_hw


def list_samples(task_name: str, data: Any) -> tuple[list[dict], list[str], list[str]]:
    """The rows and class folders the format's reader finds, after :func:`handle_duplicates`, and the groups of
    byte-identical files it left out (one line each, for the notes)."""
    rows, classes = reader(task_name, data.format)(data)
    kept, dropped = handle_duplicates(rows, duplicate_policy(data), data.split_from)
    return kept, classes, dropped


def duplicate_policy(data: Any) -> str:
    policy = data.options.conflicting_duplicates
    if policy not in DUPLICATE_POLICIES:
        raise DataError(f"data.options.conflicting_duplicates must be one of {DUPLICATE_POLICIES}, got {policy!r}")
    return policy


def handle_duplicates(rows: list[dict], policy: str, split_from: str) -> tuple[list[dict], list[str]]:
    """Byte-identical files: under split_from=seed each group goes to one split (no leak between splits);
    a group filed under two classes is a labelling error: data.options.conflicting_duplicates decides
    (fail: the validation rule fails; drop: every copy is left out and named in the notes)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        r["sha256"] = _sha256(r["path"])
        groups.setdefault(r["sha256"], []).append(r)
    dropped, out = [], []
    for group in groups.values():
        if len(group) > 1 and split_from == "seed":
            for r in group[1:]:
                r["split"] = group[0]["split"]
        if len({r["label"] for r in group}) > 1 and policy == "drop":
            dropped.append(" == ".join(f"{r['path']} ({r['label']})" for r in group))
            continue
        out += group
    order = {r["path"]: k for k, r in enumerate(rows)}
    return sorted(out, key=lambda r: order[r["path"]]), dropped


def _sha256(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return f"unreadable:{path}"


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


def batch_mixer(augment: AugmentConfig, num_classes: int):
    """torchvision's MixUp / CutMix (classification is the case they support), each batch with prob p; None
    when both are off."""
    mixers, probs = [], []
    if augment.mixup.enabled:
        mixers.append(v2.MixUp(alpha=augment.mixup.alpha, num_classes=num_classes))
        probs.append(augment.mixup.p)
    if augment.cutmix.enabled:
        mixers.append(v2.CutMix(alpha=augment.cutmix.alpha, num_classes=num_classes))
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
