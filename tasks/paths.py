"""Where each stage writes. DVC versions ``data/``, ``models/`` and ``outputs/``;
``checkpoints/`` holds resumable last checkpoints and is never versioned."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path


def outputs(task: str, stage: str) -> Path:
    return Path("outputs") / task / stage


def models(task: str, stage: str) -> Path:
    return Path("models") / task / stage


def checkpoints(task: str, stage: str) -> Path:
    return Path("checkpoints") / task / stage


def umask() -> int:
    """The process's umask, read without changing it (``/proc``), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def tmp_prefix(name: str) -> str:
    """Temporary names carry the owner's pid, so a later stage can remove those of killed processes."""
    return f".{name}.tmp-{os.getpid()}-"


def git_tracked(folder: Path) -> list[Path]:
    """The files git tracks under ``folder`` (none outside a git work tree, or without git)."""
    if shutil.which("git") is None or not folder.is_dir():
        return []
    listed = subprocess.run(["git", "ls-files", "-z", "--", "."], cwd=folder, capture_output=True)
    if listed.returncode != 0:  # not a git work tree
        return []
    return [folder / name for name in listed.stdout.decode().split("\0") if name]


def keep_files(old: Path, new: Path) -> None:
    """Copy into ``new`` the files of ``old`` a stage does not write but must survive its swap: the ones git
    tracks and DVC's ``.gitignore`` files (tracked or not yet); a file the stage wrote again is the stage's."""
    keep = set(git_tracked(old)) | set(old.rglob(".gitignore"))
    for path in sorted(keep):
        target = new / path.relative_to(old)
        if path.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder beside ``final``; it replaces ``final`` only if the block succeeds,
    so a failed (or interrupted) stage leaves no half-written output. Files git tracks in ``final`` (such as
    DVC's ``.gitignore``) that the stage did not write again are kept (:func:`keep_files`)."""
    final = Path(final)
    if os.environ.get("RANK", "0") != "0":  # a torchrun rank other than 0: work in a scratch folder, keep nothing
        with tempfile.TemporaryDirectory(prefix=f"cv-rank{os.environ['RANK']}-") as scratch:
            yield Path(scratch)
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(final.name), dir=final.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700: the output folder follows the user's umask like any other
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        keep_files(final, tmp)
        shutil.rmtree(final)
    os.replace(tmp, final)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path.name), dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600: readable by the team as the umask allows
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
