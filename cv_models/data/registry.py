"""Which reader reads which ``data.format``, per kind of task.

A reader takes the task's ``data`` settings (a :class:`~cv_models.settings.DataConfig` with that task's
``options``) and returns the rows the task trains on and validates; what the rows are is the task kind's own
(image-label rows, class-mask listings, annotation tables). The reader modules register themselves::

    @register("detection", "voc")
    def read_voc_boxes(data) -> AnnotationTables: ...

and a task asks ``reader(self.name, data.format)(data)`` instead of branching on the format.
``data.format`` itself is a closed set (``DataFormat``), checked when the settings are read.
"""
from __future__ import annotations

from typing import Any, Callable, get_args

from cv_models.base import DataError
from cv_models.settings import DataFormat

Reader = Callable[[Any], Any]  # (DataConfig) -> the task kind's rows

READERS: dict[str, dict[str, Reader]] = {}  # task kind -> data.format -> reader


def register(kind: str, fmt: str) -> Callable[[Reader], Reader]:
    """Decorator: ``fn`` reads ``data.format: fmt`` for tasks of ``kind``."""
    if fmt not in get_args(DataFormat):
        raise ValueError(f"data.format {fmt!r} is not one of {list(get_args(DataFormat))} (cv_models/settings.py: DataFormat)")

    def add(fn: Reader) -> Reader:
        READERS.setdefault(kind, {})[fmt] = fn
        return fn

    return add


def formats(kind: str) -> list[str]:
    """The formats a task kind reads, in registration order."""
    return list(READERS.get(kind, {}))


def reader(kind: str, fmt: str) -> Reader:
    """The reader of ``fmt`` for ``kind``; a format this kind has no reader for is a :class:`DataError`."""
    readers = READERS.get(kind, {})
    if fmt not in readers:
        raise DataError(f"{kind} reads data.format {sorted(readers)}, got {fmt!r}")
    return readers[fmt]
