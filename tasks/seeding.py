"""Every random seed comes from params.yaml and is applied here, in one place."""
from __future__ import annotations

import os
import random

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
