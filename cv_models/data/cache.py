"""``data.cache``: each sample decoded and resized to the training size once, then kept (in memory or on disk).

Every task's transforms start with a deterministic prefix: decode, resize the image to the training size and its
target with it (nearest for masks, scaled boxes). :func:`split_transforms` cuts the pipeline after that prefix;
:class:`CachedDataset` keeps what the prefix produced and runs the rest (the random augmentations, float conversion,
normalisation) on the kept copy at every access. The prefix draws no random numbers, so a run with a cache takes
exactly the steps of a run without one: same tensors, same random stream, bitwise-equal results.

The disk cache is one file per sample under ``.cache/`` of the project (git-ignored), in a folder named by a hash of
what the samples depend on (the data version, the split, the files and the prefix, i.e. the training size): a second
run with the same data and size reads it back; anything else gets a new folder. Files are written atomically.
"""
from __future__ import annotations

import copy
import hashlib
import io
import os
import weakref
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

CACHE_ROOT = Path(".cache")  # relative to the working folder (the project root when stages run)
FORMAT = 1  # bump when what a cache file holds changes: old folders are then never read


class _Samples(list):
    """Kept samples (a list that can be weakly referenced)."""


# key -> samples, shared by the live datasets of one process reading the same split at the same size (training and
# the train-subset scoring); weak, so the memory goes with the last dataset holding it (a long-lived worker process
# does not accumulate every run's images)
_RAM: "weakref.WeakValueDictionary[str, _Samples]" = weakref.WeakValueDictionary()


class CacheTooLarge(ValueError):
    """The cache would exceed ``data.cache_max_gb``."""


def split_transforms(transforms: Callable) -> tuple[Callable, Callable]:
    """``(prefix, rest)`` of a task's transforms: the deterministic resize, and everything after it.

    A :func:`cv_models.augment.build_transforms` pipeline starts with its resize step; a transform with its own
    ``split()`` (classification's PlainTransform) says where its prefix ends."""
    if hasattr(transforms, "split"):
        return transforms.split()
    if isinstance(transforms, v2.Compose) and isinstance(transforms.transforms[0], v2.Resize):
        return transforms.transforms[0], v2.Compose(transforms.transforms[1:])
    raise TypeError(f"data.cache: cannot find the resize step that starts {type(transforms).__name__}; a task's "
                    f"transforms must start with a deterministic resize (cv_models/augment.py build_transforms)")


# ---------------------------------------------------------------- a sample as plain tensors (weights_only files)
def _pack(x: Any) -> Any:
    if isinstance(x, Image.Image):
        return {"pil": torch.from_numpy(np.asarray(x).copy())}
    if isinstance(x, tv_tensors.BoundingBoxes):
        return {"boxes": x.as_subclass(torch.Tensor).clone(), "format": x.format.name, "canvas": list(x.canvas_size)}
    if isinstance(x, tv_tensors.Mask):
        return {"mask": x.as_subclass(torch.Tensor).clone()}
    if isinstance(x, tv_tensors.Image):
        return {"image": x.as_subclass(torch.Tensor).clone()}
    if isinstance(x, dict):
        return {"dict": {k: _pack(v) for k, v in x.items()}}
    if isinstance(x, (list, tuple)):
        return {"list": [_pack(v) for v in x], "tuple": isinstance(x, tuple)}
    return {"plain": x}  # tensors, numbers, strings


def _unpack(x: dict) -> Any:
    if "pil" in x:
        return Image.fromarray(x["pil"].numpy())
    if "boxes" in x:
        return tv_tensors.BoundingBoxes(x["boxes"], format=x["format"], canvas_size=tuple(x["canvas"]))
    if "mask" in x:
        return tv_tensors.Mask(x["mask"])
    if "image" in x:
        return tv_tensors.Image(x["image"])
    if "dict" in x:
        return {k: _unpack(v) for k, v in x["dict"].items()}
    if "list" in x:
        items = [_unpack(v) for v in x["list"]]
        return tuple(items) if x["tuple"] else items
    return x["plain"]


def _nbytes(x: Any) -> int:
    if isinstance(x, Image.Image):
        return x.width * x.height * len(x.getbands())
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


def _atomic_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)  # a reader sees the whole file or none (a kill leaves only a .tmp, never read)


class CachedDataset(Dataset):
    """``dataset`` with its transforms' prefix (decode + resize) computed once per sample and kept.

    ``mode``: ``ram`` (filled here, in this process: DataLoader workers inherit it) or ``disk`` (files under
    ``root``/``key``, filled here where missing, read at each access). ``key`` names what the samples depend on.
    """

    def __init__(self, dataset: Dataset, mode: str, key: str, max_gb: float, root: Path = CACHE_ROOT,
                 label: str = "data"):
        self.dataset, self.mode = dataset, mode
        self.prefix, self.rest = split_transforms(dataset.transforms)
        dataset.transforms = self.prefix  # the wrapped dataset now yields resized, untransformed samples
        self.folder = root / key
        n = len(dataset)
        self.index = list(range(n))  # position -> sample of the cache (a subset views some of them)
        kept = _RAM.get(key) if mode == "ram" else None
        missing = ([] if kept is not None else list(range(n))) if mode == "ram" else \
            [i for i in range(n) if not self._file(i).exists()]
        if missing:
            first = dataset[missing[0]]
            need = _nbytes(first) * n / 1e9
            where = "memory" if mode == "ram" else f"disk ({self.folder})"
            if need > max_gb:
                raise CacheTooLarge(
                    f"data.cache: {mode} would take about {need:.2f} GB of {where} for {n} {label} samples at "
                    f"{_size_of(first)} (estimated from the first sample), over data.cache_max_gb={max_gb:g}: lower "
                    f"image_size, raise data.cache_max_gb, or set data.cache: none")
            print(f"[cache] {label}: {n} samples at {_size_of(first)} -> about {need:.3f} GB of {where}"
                  f"{'' if len(missing) == n else f' ({n - len(missing)} already cached)'}", flush=True)
        if mode == "ram":
            if kept is None:
                kept = _RAM[key] = _Samples(dataset[i] for i in range(n))
            self.kept = kept
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            for i in missing:
                _atomic_save(_pack(dataset[i]), self._file(i))
            if not missing:
                print(f"[cache] {label}: {n} samples read from {self.folder}", flush=True)

    def _file(self, i: int) -> Path:
        return self.folder / f"{i}.pt"

    def subset(self, task, indices: list[int]) -> "CachedDataset":
        """The samples at ``indices``, read from this cache; the task's own subset of the wrapped dataset answers
        everything else (records, ground truth)."""
        view = copy.copy(self)
        view.dataset = task.subset(self.dataset, indices)
        view.index = [self.index[i] for i in indices]
        return view

    def __len__(self) -> int:
        return len(self.index)

    def __getattr__(self, name: str):  # the wrapped dataset's own attributes (samples, records, by_id, ...)
        # never its protocol methods: a Subset's __getitems__ would make the DataLoader read around the cache
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i: int):
        i = self.index[i]
        if self.mode == "ram":
            image, target = self.kept[i]
            target = copy.deepcopy(target)  # a step changing a target in place must not change the kept one
        else:
            image, target = _unpack(torch.load(self._file(i), weights_only=True))
        return self.rest(image, target)


def _size_of(sample) -> str:
    image = sample[0]
    w, h = image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])
    return f"{w}x{h}"


def cache_key(*parts: Any) -> str:
    """A folder name from what the cached samples depend on (data version, split, files, prefix, ...)."""
    h = hashlib.sha256(repr((FORMAT, *parts)).encode())
    return h.hexdigest()[:24]
