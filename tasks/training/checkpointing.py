"""When and how the training loop keeps its resumable ``last.pt`` (issue 33): every ``train.checkpoint_every``
epochs, and on a GPU in a background thread, so that a fast device does not wait for the file.

Neither changes what is trained: a checkpoint reads the state, never the random generators' next draws.
A background write first copies the state to the CPU (training may change its tensors at once), then one
thread serialises it and replaces the file atomically; the next write, the end of training and a later resume
of the same file wait for it. Its error, if any, is raised by the next write or by :meth:`BackgroundWriter.wait`.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import torch

_PENDING: dict[Path, threading.Thread] = {}  # a background write per checkpoint file of this process
_LOCK = threading.Lock()


def due(epoch: int, planned: int, every: int, stopping: bool) -> bool:
    """Write ``last.pt`` after this epoch: every ``every``-th, the last planned one and one training stops at."""
    return epoch % every == 0 or epoch >= planned or stopping


def in_background(setting: bool | str, device: torch.device) -> bool:
    """``train.checkpoint_background``; auto: on an accelerator (the loop would wait for the write while the
    device idles), not on the CPU (there a second thread competes with training for the same cores)."""
    return device.type != "cpu" if setting == "auto" else bool(setting)


def cpu_copy(obj):
    """``obj`` with every tensor copied to the CPU and every container rebuilt: nothing training changes later."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj  # numbers, strings, None: immutable


class BackgroundWriter:
    """Writes checkpoints with ``write(path, state)`` in a thread, one at a time."""

    def __init__(self, write: Callable[[Path, dict], None]):
        self.write = write
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, path: Path, state: dict) -> None:
        self.wait()
        snapshot = cpu_copy(state)
        self.thread = threading.Thread(target=self._run, args=(path, snapshot), name=f"checkpoint {path.name}")
        with _LOCK:
            _PENDING[Path(path).resolve()] = self.thread
        self.thread.start()

    def _run(self, path: Path, state: dict) -> None:
        try:
            self.write(path, state)
        except BaseException as err:  # raised in the training thread by the next submit or wait
            self.error = err

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            err, self.error = self.error, None
            raise err


def wait_for(path: Path) -> None:
    """Return once a background write of ``path`` started in this process (e.g. by an interrupted run) is done."""
    with _LOCK:
        thread = _PENDING.pop(Path(path).resolve(), None)
    if thread is not None:
        thread.join()
