"""Find how a folder of data is laid out: every detector of :mod:`cv_models.data.layout_rules` is tried on
the folder, then on its sub-folders level by level; the shallowest level with a reading wins.

One reading left (after ``--task`` / ``--format``): that is the layout. Several: :class:`AmbiguousLayout`
lists them with what tells them apart and the flag that picks one. None: :class:`NoLayout` names the
closest layout and what is missing. Nothing is guessed silently.
"""
from __future__ import annotations

from pathlib import Path

from cv_models.base import DataError
from cv_models.data.layout_facts import Miss, Reading, subdirs
from cv_models.data.layout_rules import DETECTORS

MAX_DEPTH = 4  # folders below PATH searched for a layout
MAX_FOLDERS_PER_LEVEL = 300  # a level with more folders is one of the data's own (one per image, say): not searched


class AmbiguousLayout(DataError):
    """Two or more readings fit: the user picks one with --task or --format."""

    def __init__(self, path: Path, readings: list[Reading]):
        self.readings = readings
        tasks = {r.task for r in readings}
        flag = "--format" if len(tasks) == 1 else "--task (or --format)"
        lines = [f"{path}: {len(readings)} layouts fit; pick one with {flag} (nothing is guessed):"]
        lines += [f"  {k + 1}. {r.describe()}  -> --task {r.task} --format {r.format}" for k, r in enumerate(readings)]
        super().__init__("\n".join(lines))


class NoLayout(DataError):
    """No layout fits: the closest one and what is missing."""

    def __init__(self, path: Path, misses: list[Miss], wanted: str):
        self.misses = sorted(misses, key=lambda m: -m.score)
        if self.misses:
            best = self.misses[0]
            text = (f"{path}: no supported layout fits{wanted}. Closest: {best.layout} at {best.where}; missing: "
                    f"{best.missing}")
            text += "".join(f"\n  also near: {m.layout} at {m.where}; missing: {m.missing}" for m in self.misses[1:3])
        else:
            text = (f"{path}: no supported layout fits{wanted}, and no image folder or annotation file was found within "
                    f"{MAX_DEPTH} folder levels (rule: a folder per class, image + mask folders, COCO JSON, VOC XML, YOLO "
                    f"txt or per-instance mask folders; docs/init.md lists them)")
        super().__init__(text)


def _keep(readings: list[Reading], task: str | None, fmt: str | None) -> list[Reading]:
    """Readings that serve the task asked for (as their own task first) and have the format asked for."""
    if fmt:
        readings = [r for r in readings if r.format == fmt]
    if task:
        own = [r for r in readings if r.task == task]
        readings = own or [r.as_task(task) for r in readings if r.serves(task)]
    return readings


def search(path: Path) -> tuple[list[list[Reading]], list[Miss]]:
    """Readings per folder level (level 0 is ``path``), and every near miss seen."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a folder (rule: init reads a dataset folder)")
    levels, misses, level = [], [], [path]
    for _ in range(MAX_DEPTH + 1):
        readings = []
        for folder in level:
            for detect in DETECTORS:
                for found in detect(folder):
                    (readings if isinstance(found, Reading) else misses).append(found)
        levels.append(readings)
        nxt = [d for f in level for d in subdirs(f)]
        level = nxt if len(nxt) <= MAX_FOLDERS_PER_LEVEL else []
    return levels, misses


def find_layout(path: Path, task: str | None = None, fmt: str | None = None) -> Reading:
    """The one reading of ``path`` (see the module's docstring)."""
    levels, misses = search(Path(path))
    for readings in levels:
        kept = _keep(readings, task, fmt)
        if len(kept) == 1:
            return kept[0]
        if kept:
            raise AmbiguousLayout(Path(path), kept)
    wanted = "".join(f" with {flag} {v}" for flag, v in (("--task", task), ("--format", fmt)) if v)
    seen = [r for readings in levels for r in readings]
    if seen:  # readings exist, but not of the task / format asked for
        misses = [Miss(f"{r.task} / {r.format}", 0.9, f"nothing for{wanted}; this folder reads as {r.describe()}",
                       Path(r.data["path"])) for r in seen] + misses
    raise NoLayout(Path(path), misses, wanted)
