"""The pipeline's epoch time against a bare PyTorch loop over the same images preloaded in memory (issue 13).

Real data: ../shared/datasets/trashnet150 beside the repository (TrashNet, 6 classes, 150x150 JPEGs, split by seed). Both sides train
the same model built by the task (resnet18 by default) with the same threads, batch size, optimiser and schedule.
The bare loop holds every training image as a normalised float tensor (a plain list) and stacks shuffled batches:
no decoding, no transforms, no DataLoader. The pipeline is tasks.training.engine.fit on the task's datasets (no
augmentation, the baseline's transforms) with ``data.cache: ram`` and, for context, ``none``. Prints the median
training-pass time per epoch of each and the ratios; also the full pipeline epoch (with its validation pass and
the train-subset scoring of the overfitting diagnosis), which the bare loop does not do.

    .venv/bin/python -m benchmarks.epoch_time [--size 64] [--epochs 4] [--model resnet18] [--workers 0]

Normalisation uses fixed statistics (the time does not depend on them). Run it on an otherwise idle machine if
you can: other processes on the cores inflate both sides unevenly.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cv_models import get_task
from cv_models.data.cache import CachedDataset
from cv_models.normalize import Normalize
from tasks.config import load_params
from tasks.training import engine
from tasks.training.seeding import seed_everything

DATA = str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "trashnet150" / "data" / "dataset-resized")


def bare_epochs(task, cfg, images: list[torch.Tensor], labels: list[int], seed: int) -> list[float]:
    """Seconds per epoch of the plainest loop: tensors in memory, shuffled batches, forward, backward, step."""
    seed_everything(seed)
    model = task.build_model().train()
    t = cfg.train
    steps = len(images) // t.batch_size  # drop_last, as the pipeline does
    opt = engine.build_optimizer(model, t.optimizer)
    sched = engine.build_scheduler(opt, t, steps)
    y_all = torch.tensor(labels)
    times = []
    for _ in range(t.epochs):
        start = time.perf_counter()
        order = torch.randperm(len(images))
        for b in range(steps):
            idx = order[b * t.batch_size : (b + 1) * t.batch_size]
            x = torch.stack([images[i] for i in idx])
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss.item()  # the pipeline reads every loss (finite check, progress)
        times.append(time.perf_counter() - start)
    return times


def pipeline_epochs(task, cfg, train, val, train_eval, seed: int, out: Path) -> dict[str, list[float]]:
    seed_everything(seed)
    model = task.build_model()
    result = engine.fit(
        task, model, train, val, cfg.train, seed, out / "model.pt", train_eval_set=train_eval, desc="bench"
    )
    return result.timings


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument(
        "--limit",
        type=int,
        default=600,
        help="train images (an even spread over the split); val gets a quarter as many; 0 = all 1771 / 378",
    )
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers of the pipeline runs")
    ap.add_argument("--modes", default="ram,none", help="data.cache modes to time, comma-separated")
    ap.add_argument(
        "--repeats", type=int, default=2, help="rounds of bare + each mode, in turn (machine noise hits all)"
    )
    args = ap.parse_args()
    t = "tasks.classification."
    params = load_params(
        "params.yaml",
        {
            t + "data.path": args.data,
            t + "data.split_from": "seed",
            t + "image_size": args.size,
            t + "model.name": args.model,
            t + "train.epochs": args.epochs,
            t + "train.batch_size": args.batch,
            t + "train.num_threads": args.threads,
            t + "train.num_workers": args.workers,
            t + "train.resume": False,
        },
    )
    cfg = params.task("classification")
    task = get_task("classification", cfg)
    engine.set_threads(args.threads)
    norm = Normalize("per_channel_std", torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.25, 0.25, 0.25]))

    def limited(split: str, transforms, n: int):
        data = task.dataset(split, transforms)
        if n and n < len(data):  # every k-th sample: the classes keep their shares
            keep = [round(i * len(data) / n) for i in range(n)]
            data.samples, data.labels = [data.samples[i] for i in keep], [data.labels[i] for i in keep]
        return data

    def datasets(mode: str):
        train = limited("train", task.train_transforms(None, norm), args.limit)
        val = limited("val", task.eval_transforms(norm), args.limit // 4)
        plain = limited("train", task.eval_transforms(norm), args.limit)
        indices = engine.stratified_indices(plain.labels, len(val), params.seed)
        if mode == "none":
            return train, val, task.subset(plain, indices)
        # keys as tasks/training/train.py makes them: the train split is kept once for training and the train-subset scoring
        key = f"bench-{args.size}-{args.limit}"
        train = CachedDataset(train, mode, f"{key}-train", 4.0, label="train")
        val = CachedDataset(val, mode, f"{key}-val", 4.0, label="val")
        return train, val, CachedDataset(plain, mode, f"{key}-train", 4.0).subset(task, indices)

    train0 = limited("train", task.eval_transforms(norm), args.limit)
    start = time.perf_counter()
    images = [train0[i][0].as_subclass(torch.Tensor) for i in range(len(train0))]  # preloaded, as the bare loop's
    print(f"bare loop: {len(images)} images preloaded in {time.perf_counter() - start:.1f}s", flush=True)
    # each run's first epoch is left out of the medians (warm-up: first allocations, lazy initialisation)
    bare: list[float] = []
    results = {mode: {"train": [], "val": []} for mode in args.modes.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            epochs = bare_epochs(task, cfg, images, train0.labels, params.seed)
            bare += epochs[1:]
            print(f"round {r + 1} bare loop epochs: {' '.join(f'{s:.2f}' for s in epochs)}", flush=True)
            for mode in results:
                start = time.perf_counter()
                train, val, train_eval = datasets(mode)
                fill = time.perf_counter() - start
                tm = pipeline_epochs(task, cfg, train, val, train_eval, params.seed, Path(tmp) / f"{mode}{r}")
                results[mode]["train"] += tm["train"][1:]
                results[mode]["val"] += tm["val"][1:]
                print(
                    f"round {r + 1} cache {mode}: train passes {' '.join(f'{s:.2f}' for s in tm['train'])}; validation "
                    f"passes {' '.join(f'{s:.2f}' for s in tm['val'])} (datasets ready in {fill:.1f}s)",
                    flush=True,
                )
    b = statistics.median(bare)
    print(
        f"\nclassification on {args.data}: {len(images)} train images at {args.size}px, model {args.model}, "
        f"batch {args.batch}, {args.threads} thread(s), {args.workers} worker(s), {args.epochs} epochs x "
        f"{args.repeats} rounds (medians without each run's first epoch), {os.cpu_count()} cores"
    )
    print(f"median bare epoch (tensors in memory): {b:.2f}s")
    for mode, tm in results.items():
        tr, va = statistics.median(tm["train"]), statistics.median(tm["val"])
        print(
            f"cache {mode:4s}: median training pass {tr:.2f}s -> ratio {tr / b:.3f}; with its validation pass "
            f"{tr + va:.2f}s -> ratio {(tr + va) / b:.3f}"
        )
    print("goal: training-pass ratio <= 1.10 with cache ram")


if __name__ == "__main__":
    main()
