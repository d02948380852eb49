"""What layout detection works with: a reading of a folder (task, format, the ``data`` settings that read it)
or a near miss (the closest layout and what is missing), and cheap facts about folders (their image files,
split-named folders, whether files look like label masks)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from cv_models.data.probe import IMAGE_SUFFIXES

# the split names datasets use on disk, per split of the pipeline
SPLIT_ALIASES = {
    "train": ("train", "training", "train2017", "train2014", "trainval"),
    "val": ("val", "valid", "validation", "val2017", "val2014", "dev"),
    "test": ("test", "testing", "test2017", "test2014"),
}
MAX_LABEL_VALUES = 64  # a label mask holds at most this many distinct values (photos hold hundreds)


@dataclass
class Reading:
    """One way to read a folder: the task and format, the ``data`` block that reads it and why it fits."""

    task: str
    format: str
    data: dict  # tasks.<task>.data as params.yaml takes it (path, format, classes, split_from, options)
    evidence: str  # what in the folder says so (tells this reading apart from others)
    also: tuple[str, ...] = ()  # other tasks the same annotations serve (--task picks one)
    facts: dict = field(default_factory=dict)  # what detection learnt on the way (ignore values, mask values, ...)

    def serves(self, task: str) -> bool:
        return task == self.task or task == "any" or task in self.also

    def as_task(self, task: str) -> Reading:
        """The same annotations read by another task they serve (a COCO polygon file as detection, say)."""
        if task in ("any", self.task):
            return self
        return Reading(task, self.format, self.data, self.evidence + f" (read as {task})", (), self.facts)

    def describe(self) -> str:
        also = f"; also serves {', '.join(self.also)} (--task)" if self.also else ""
        return f"{self.task} / format {self.format} at {self.data['path']}: {self.evidence}{also}"


@dataclass
class Miss:
    """A layout that nearly fits: its name, how close (0..1) and what is missing."""

    layout: str
    score: float
    missing: str
    where: Path


def is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


@lru_cache(maxsize=4096)
def listing(folder: Path) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(sub-folders, files) of a folder, sorted, hidden entries left out; a folder that cannot be read is empty."""
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return (), ()
    return tuple(p for p in entries if p.is_dir()), tuple(p for p in entries if p.is_file())


def images_in(folder: Path) -> list[Path]:
    return [p for p in listing(folder)[1] if is_image(p)]


def subdirs(folder: Path) -> tuple[Path, ...]:
    return listing(folder)[0]


def split_of(name: str) -> str | None:
    """The pipeline split a folder or file name stands for (``train2017`` -> train), else None."""
    for split, names in SPLIT_ALIASES.items():
        if name.lower() in names:
            return split
    return None


def splits_present(names: list[str]) -> dict[str, str]:
    """split -> the name on disk, from file or folder names; an exact split name wins over an alias (train over trainval)."""
    found: dict[str, str] = {}
    for name in sorted(names, key=lambda n: split_of(n) != n):
        split = split_of(name)
        if split and split not in found:
            found[split] = name
    return found


def split_token(text: str) -> tuple[str, str] | None:
    """(split, the token as written) of the first split name inside a path or file name, e.g. instances_val2017."""
    for token in re.split(r"[/_.\-]", text):
        split = split_of(token)
        if split:
            return split, token
    return None


def split_names(found: dict[str, str]) -> dict[str, str] | None:
    """``data.options.splits`` for the split names found on disk (None when they are train/val/test already)."""
    return None if all(k == v for k, v in found.items()) else dict(found)


@lru_cache(maxsize=1024)
def mask_values(path: Path) -> tuple[str, tuple[int, ...]] | None:
    """(mode, distinct values) of an image with few values, i.e. a label mask; None otherwise. Colour masks
    (CamVid's ``_L.png``) give mode ``RGB`` and their colours packed as ``r << 16 | g << 8 | b``."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("RGB", "RGBA"):
                rgb = np.asarray(im.convert("RGB")).astype(np.int64)
                mode, values = "RGB", np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
            elif mode in ("1", "L", "P", "I", "I;16"):
                values = np.unique(np.asarray(im))
            else:
                return None
    except OSError:
        return None
    if len(values) > MAX_LABEL_VALUES:
        return None
    return mode, tuple(int(v) for v in values)


def label_like(folder: Path, sample: int = 6) -> tuple[str, set[int]] | None:
    """(mode, values seen) when a sample of the folder's images are all label masks; None otherwise."""
    files = images_in(folder)
    if not files:
        return None
    step = max(1, len(files) // sample)
    seen: set[int] = set()
    mode, most = "", 0
    for p in files[::step][:sample]:
        facts = mask_values(p)
        if facts is None:
            return None
        mode, values = facts
        seen |= set(values)
        most = max(most, len(values))
    if len(seen) > MAX_LABEL_VALUES or (mode == "RGB" and len(seen) > 2 * most):
        return None  # class colours repeat from file to file; segment ids (COCO panoptic PNGs) do not
    return mode, seen


def rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else "."
