"""Every random seed comes from params.yaml and is applied here, in one place."""

from __future__ import annotations

import hashlib
import os
import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> dict[str, int]:
    """Seed Python, NumPy and torch; return the seeds used (they are logged to MLflow)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)  # for subprocesses (DataLoader workers)
    return {"seed": seed, "seed.python": seed, "seed.numpy": seed % 2**32, "seed.torch": seed, "seed.dataloader": seed}


def loader_generator(seed: int) -> torch.Generator:
    """Generator for DataLoader shuffling; worker seeds derive from it too."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: torch already seeds each worker from the loader's generator;
    this carries that seed over to Python's and NumPy's generators."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def init_seed(seed: int) -> int:
    """The seed a model's initial weights are drawn from: a function of the run seed alone, apart from the
    stream that drives augmentation, so every model of a task built with one seed starts from one set of weights."""
    digest = hashlib.sha256(f"init-weights:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


@contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and torch (CPU) for the block, then put every generator back as it was: what runs
    inside neither depends on nor disturbs the draws made before and after it."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def state_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes, in order): equal hashes, equal weights."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()
