"""Object crops of a detection task's train split, one folder per class (an ImageFolder), as a dataset
for the pretraining stage: a backbone that has learnt the objects themselves before it learns to find
them. Point ``pretrain.data`` at ``crops.out`` with ``pretrain.split_from: seed`` (the crops get their
own train/val split). Only the task's train split is read, so its val and test images stay unseen."""
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
    task = get_task(c.task, params.task(c.task))
    if not hasattr(task, "records"):
        raise ConfigError(f"crops.task {c.task!r} has no boxes to crop; name a detection task")
    names = task.class_names()
    counts: Counter = Counter()
    with atomic_dir(Path(c.out)) as tmp:  # the crops folder is this stage's own: replaced whole, or not at all
        for name in names:
            (tmp / name).mkdir()
        for rec in task.records("train"):
            image = load_rgb(rec["path"])
            for k, (box, label) in enumerate(zip(rec["boxes"].tolist(), rec["labels"].tolist())):
                crop = image.crop(square_around(box, c.context)).resize((c.size, c.size), Image.BILINEAR)
                crop.save(tmp / names[label - 1] / f"{rec['image_id']:05d}_{Path(rec['file_name']).stem}_{k}.png")
                counts[names[label - 1]] += 1
        summary = {"task": c.task, "split": "train", "crops_per_class": {n: counts[n] for n in names}, "size": c.size}
    print(f"[crops] {sum(counts.values())} crops of {c.task}'s train split -> {c.out}: {dict(counts)}")
    return summary
