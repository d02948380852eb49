"""What the four plain scripts share: their arguments, the manifest they read, the time budget and run.json.

A plain script is what one writes by hand from the torchvision docs: a model, the images preloaded in
memory as tensors, a loop with a fixed optimiser, no validation split, the last weights scored."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True, help="manifest.json written by benchmarks/real_data.py")
    ap.add_argument("--budget-seconds", type=float, required=True, help="training wall time")
    ap.add_argument("--out", required=True, help="folder for the test split's predictions")
    ap.add_argument("--settings", default="{}", help="JSON: size, batch_size, lr, model ...")
    args = ap.parse_args()
    args.settings = json.loads(args.settings)
    args.manifest = json.loads(Path(args.manifest).read_text())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # "seed" (benchmarks/real_data.py --seed) moves the weights, the batch order and the flips
    seed = args.settings.setdefault("seed", 0)
    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
    torch.set_num_threads(1)
    # "device" (benchmarks/real_data.py --device): where the model and the preloaded images live
    args.device = torch.device(args.settings.setdefault("device", "cpu"))
    return args


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """float 3 x size x size in [0, 1]"""
    resized = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255


def train_within(budget_s: float, epoch: Callable[[int], float]) -> dict:
    """Run ``epoch(k)`` (returns the mean loss) while the slowest epoch so far still fits in the budget."""
    start, slowest, k = time.perf_counter(), 0.0, 0
    while True:
        t = time.perf_counter()
        loss = epoch(k)
        k += 1
        slowest = max(slowest, time.perf_counter() - t)
        spent = time.perf_counter() - start
        print(f"epoch {k}: loss {loss:.4f} ({spent:.0f} s)", flush=True)
        if spent + slowest > budget_s:
            return {"epochs": k, "seconds": round(spent, 1)}


def batches(n: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    order = torch.randperm(
        n, generator=torch.Generator().manual_seed(epoch + 100_003 * seed)
    ).tolist()  # seed 0: as before
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [order]


def finish(out: str, info: dict) -> None:
    (Path(out) / "run.json").write_text(json.dumps(info, indent=2))
