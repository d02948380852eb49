"""When and how the training loop keeps its resumable ``last.pt`` (issue 33): every ``train.checkpoint_every``
epochs, and on a GPU in a background thread, so that a fast device does not wait for the file.

Neither changes what is trained: a checkpoint reads the state, never the random generators' next draws.
A background write first copies the state to the CPU (training may change its tensors at once), then one
thread serialises it and replaces the file atomically; the next write, the end of training and a later resume
of the same file wait for it. Its error, if any, is raised by the next write or by :meth:`BackgroundWriter.wait`.
"""

from __future__ import annotations

import io
import pickle
import random
import threading
from pathlib import Path
from typing import Callable

import torch

from tasks.paths import atomic_write_bytes

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


class CheckpointError(RuntimeError):
    """A resume checkpoint that cannot be trusted or used (the message names the file and the rule)."""


def get_rng_states() -> dict:
    """torch, Python and numpy generators as tensors and plain containers (weights_only can load them)."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "python": [version, list(state), gauss_py],
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)],
    }


def set_rng_states(states) -> None:
    import numpy as np

    if isinstance(states, torch.Tensor):  # a checkpoint holding only torch's state
        torch.set_rng_state(states)
        return
    torch.set_rng_state(states["torch"])
    version, state, gauss_py = states["python"]
    random.setstate((version, tuple(state), gauss_py))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def read_resume_checkpoint(path: Path) -> dict:
    """The last checkpoint, loaded with ``weights_only=True``: tensors and plain containers only, never code.
    Checkpoint folders are shared scratch space, copied between machines: a file that needs more is refused."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, ImportError, TypeError) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        # torch's message opens with how to load the file unsafely and ends with a link: the reason is in between
        reason = " ".join(
            ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation"))
        )
        raise CheckpointError(
            f"{path}: refused to resume from this checkpoint (rule: resume checkpoints load with weights_only=True, "
            f"holding tensors and plain containers only; {type(err).__name__}: {reason or ' '.join(lines)}). Nothing "
            f"was run from it and nothing else was changed; delete the file to start this stage afresh."
        ) from None
    if not isinstance(ck, dict):
        raise CheckpointError(
            f"{path}: not a resume checkpoint (rule: a dict written by tasks/training/engine.py); delete it "
            f"to start this stage afresh"
        )
    return ck


def write_checkpoint(path: Path, state: dict) -> None:
    """``state`` serialised whole, then written atomically: a kill mid-write leaves the previous file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def save_last(path: Path, state: dict, writer: BackgroundWriter | None) -> None:
    """What the training loop waits for to keep ``last.pt``: the whole write, or with a background writer a copy
    of the state to the CPU (benchmarks/epoch_profile.py times this call)."""
    if writer is None:
        write_checkpoint(path, state)
    else:
        writer.submit(path, state)
