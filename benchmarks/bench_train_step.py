"""Training-loop overhead of the pipeline against a bare PyTorch loop (classification).

Both train the same model (params.yaml's classification model) on the same data (the
synthetic shapes, or whatever tasks.classification.data.path points at) for the same epochs
with the same threads, batch size, optimiser and schedule, and both score the validation
split after every epoch. The bare loop reads the same PNG files with PIL and normalises with
the same statistics, so the only difference is the pipeline's machinery: progress bar,
checkpoints, best-model tracking, metrics, MLflow-free callbacks. Prints the median time of
each over several alternating repeats and the ratio (target: at most 1.05).

    python benchmarks/bench_train_step.py [--epochs 5] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from bare_loop import run_bare_loop
from cv_models import get_task
from cv_models.normalize import load_normalizer
from tasks.training import engine
from tasks.config import load_params
from tasks.training.seeding import seed_everything


class BareImageFolder(Dataset):
    def __init__(self, samples, labels, size, mean, std):
        self.samples, self.labels, self.size = samples, labels, size
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        with Image.open(self.samples[i]["path"]) as im:
            im = im.convert("RGB")
            if im.size != (self.size, self.size):
                im = im.resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std, self.labels[i]


def bare_loop(task, cfg, train_set, val_set, seed):
    seed_everything(seed)
    model = task.build_model()
    t = cfg.train
    loader = DataLoader(
        train_set, batch_size=t.batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed)
    )
    val_loader = DataLoader(val_set, batch_size=t.eval_batch_size)
    opt = engine.build_optimizer(model, t.optimizer)
    sched = engine.build_scheduler(opt, t, len(loader))

    def validate(model, val_loader):
        return sum((model(x).argmax(1) == y).sum().item() for x, y in val_loader)

    return run_bare_loop(
        model, loader, val_loader, opt, sched, t.epochs, lambda m, x, y: F.cross_entropy(m(x), y), validate
    )[0]


def pipeline_loop(task, cfg, train_set, val_set, seed, out: Path):
    seed_everything(seed)
    model = task.build_model()
    start = time.perf_counter()
    engine.fit(task, model, train_set, val_set, cfg.train, seed, out / "model.pt", out / "last.pt", desc="bench")
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(
        args.params,
        {"tasks.classification.train.epochs": args.epochs, "tasks.classification.train.num_threads": args.threads},
    )
    cfg = params.task("classification")
    task = get_task("classification", cfg)
    stats_dir = Path("outputs/classification/normstats")
    if not stats_dir.exists():
        raise SystemExit("run `dvc repro normstats@classification` first (the benchmark uses its statistics)")
    norm = load_normalizer(stats_dir, "per_channel_std")
    train = task.dataset("train", task.train_transforms(None, norm))
    val = task.dataset("val", task.eval_transforms(norm))
    bare_train = BareImageFolder(train.samples, train.labels, cfg.image_size, norm.mean.tolist(), norm.std.tolist())
    bare_val = BareImageFolder(val.samples, val.labels, cfg.image_size, norm.mean.tolist(), norm.std.tolist())
    times = {"pipeline": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # alternate, so machine noise hits both alike
            times["bare"].append(bare_loop(task, cfg, bare_train, bare_val, params.seed))
            times["pipeline"].append(pipeline_loop(task, cfg, train, val, params.seed, Path(tmp) / str(r)))
            print(f"repeat {r + 1}: bare {times['bare'][-1]:.2f}s  pipeline {times['pipeline'][-1]:.2f}s", flush=True)
    bare, pipe = statistics.median(times["bare"]), statistics.median(times["pipeline"])
    print(
        f"\nclassification, {len(train)} train images, {args.epochs} epochs, {args.threads} threads, "
        f"batch {cfg.train.batch_size}, model {cfg.model.name}"
    )
    print(f"median bare PyTorch loop: {bare:.2f}s   median pipeline (tasks.training.engine.fit): {pipe:.2f}s")
    print(f"ratio pipeline / bare = {pipe / bare:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
