"""Object crops of a detection or instance-segmentation task's train split, one folder per class (an
ImageFolder), as a dataset for the pretraining stage: a backbone that has learnt the objects themselves
before it learns to find them. Point ``pretrain.data`` at ``crops.out`` with ``pretrain.split_from: seed``
(the crops get their own train/val split). Only the task's train split is read, so its val and test images
stay unseen; ``crops.classes: all`` also crops the classes the task's ``keep_classes`` leaves out."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from cv_models import get_task
from cv_models.data.probe import load_rgb
from tasks.config import ConfigError, load_params
from tasks.paths import atomic_dir


def square_around(box: list[float], context: float) -> tuple[int, int, int, int]:
    """A square centred on the box, its side the box's longer side plus ``context`` of it (PIL pads outside)."""
    x0, y0, x1, y1 = box
    half = max(x1 - x0, y1 - y0) * (1 + context) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return round(cx - half), round(cy - half), round(cx + half), round(cy + half)


def run(params_path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> dict:
    params = load_params(params_path, overrides)
    c = params.crops
    if c.task not in params.tasks:
        raise ConfigError(f"crops.task {c.task!r} is not a task in params.yaml (tasks: {sorted(params.tasks)})")
    settings = params.task(c.task)
    if c.classes == "all" and getattr(settings.data.options, "keep_classes", None):
        # the same reader without the class filter: the same images, so the same seeded train split
        settings = settings.model_copy(
            update={
                "data": settings.data.model_copy(
                    update={"options": settings.data.options.model_copy(update={"keep_classes": None})}
                )
            }
        )
    task = get_task(c.task, settings)
    train = task.object_boxes("train")
    if train is None:
        raise ConfigError(f"crops.task {c.task!r} has no boxes to crop; name a detection or instance_segmentation task")
    names = task.class_names()
    counts: Counter = Counter()
    with atomic_dir(Path(c.out)) as tmp:  # the crops folder is this stage's own: replaced whole, or not at all
        for name in names:
            (tmp / name).mkdir()
        for rec in train:
            image = load_rgb(rec["path"])
            for k, (box, label) in enumerate(zip(rec["boxes"], rec["labels"])):
                crop = image.crop(square_around(box, c.context)).resize((c.size, c.size), Image.BILINEAR)
                crop.save(tmp / names[label - 1] / f"{rec['image_id']:05d}_{Path(rec['file_name']).stem}_{k}.png")
                counts[names[label - 1]] += 1
        for name in names:  # an ImageFolder has no empty class folders (a class with no train box is left out)
            if not counts[name]:
                (tmp / name).rmdir()
        summary = {
            "task": c.task,
            "split": "train",
            "crops_per_class": {n: counts[n] for n in names if counts[n]},
            "size": c.size,
        }
    print(f"[crops] {sum(counts.values())} crops of {c.task}'s train split -> {c.out}: {dict(counts)}")
    return summary
