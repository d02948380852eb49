"""Where each stage writes. DVC versions ``data/``, ``models/`` and ``outputs/``;
``checkpoints/`` holds resumable last checkpoints and is never versioned."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def outputs(task: str, stage: str) -> Path:
    return Path("outputs") / task / stage


def models(task: str, stage: str) -> Path:
    return Path("models") / task / stage


def checkpoints(task: str, stage: str) -> Path:
    return Path("checkpoints") / task / stage


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder beside ``final``; it replaces ``final`` only if the block succeeds,
    so a failed stage leaves no half-written output."""
    final = Path(final)
    if os.environ.get("RANK", "0") != "0":  # a torchrun rank other than 0: work in a scratch folder, keep nothing
        with tempfile.TemporaryDirectory(prefix=f"cv-rank{os.environ['RANK']}-") as scratch:
            yield Path(scratch)
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
