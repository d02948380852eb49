"""ImageFolder datasets: ``root/<split>/<class>/<image>`` or ``root/<class>/<image>`` split by seed."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cv_models.base import DataError
from cv_models.data.registry import register

SPLITS = ("train", "val", "test")


def list_samples(root: Path, split_from: str, fractions: dict[str, float], seed: int) -> tuple[list[dict], list[str]]:
    """Every file under the class folders as ``{path, split, label}``, and the class folder names.

    Non-image files are listed too: validation reports them rather than silently skipping them.
    """
    if not root.exists():
        raise DataError(f"dataset path {root} does not exist (rule: data.path must be an existing folder)")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a folder (rule: data.path must be an existing folder)")
    rows: list[dict] = []
    if split_from == "folders":
        missing = [s for s in SPLITS if not (root / s).is_dir()]
        if missing:
            raise DataError(
                f"{root}: split folder(s) {missing} missing (rule: split_from=folders needs "
                f"{root}/train, val and test; use split_from: seed for a folder of class folders)"
            )
        classes = sorted({d.name for s in SPLITS for d in (root / s).iterdir() if d.is_dir()})
        for split in SPLITS:
            for cls in classes:
                folder = root / split / cls
                files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
                rows += [{"path": str(p), "split": split, "label": cls} for p in files]
    else:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        rng = np.random.default_rng(seed)
        for cls in classes:
            files = sorted(p for p in (root / cls).iterdir() if p.is_file())
            order = rng.permutation(len(files))  # per class, so every class lands in every split
            n_train = int(round(len(files) * fractions["train"]))
            n_val = int(round(len(files) * fractions["val"]))
            for rank, idx in enumerate(order):
                split = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
                rows.append({"path": str(files[idx]), "split": split, "label": cls})
    if not classes:
        raise DataError(f"{root}: no class folders found (rule: ImageFolder needs one folder per class)")
    return rows, classes


@register("classification", "imagefolder")
def read_imagefolder(data) -> tuple[list[dict], list[str]]:
    """``data.format: imagefolder``: the rows of :func:`list_samples` and the class folder names."""
    return list_samples(Path(data.path), data.split_from, data.split_fractions, data.split_seed)
