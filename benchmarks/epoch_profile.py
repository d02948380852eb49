"""Where a pipeline epoch goes, part by part, against a plain PyTorch loop on the same work (issue 33).

For each task, the pipeline's epoch (tasks.training.engine.fit, as the augmented stage runs it: the task's augmentations,
validation, the train-subset scoring, last.pt, metrics to MLflow) is split into parts, each timed as the
training loop waits for it:

  data        waiting for the next training batch: reading, decoding, augmenting, collating (the DataLoader)
  mix         the task's batch-level augmentation (MixUp, CutMix, mosaic, copy-paste), when it has one
  step        the rest of the training pass: to the device, forward, loss, backward, optimiser, schedule, progress bar
  validation  the validation pass and the train-subset scoring of the overfitting diagnosis
  checkpoint  keeping the resumable last.pt (weights, optimiser state, RNG states): what the loop waits for
  logging     the epoch's metrics to MLflow
  other       the rest of the epoch (best-weights copy, time-limit planning, printing)

The parts add up to the epoch. The plain loop trains the same model on the same training images with the same
optimiser, schedule and batch size: the images preloaded once as tensors on the device (the task's evaluation
transforms: resized and normalised, no augmentation), shuffled batches, forward, backward, step; no validation,
no checkpoint, no logging, as a hand-written script does. Printed: each part's seconds and share of the epoch,
and the ratios pipeline epoch / plain loop and training pass / plain loop (means over the epochs after the first,
which carries one-time costs).

    python -m tasks generate                                  # once: the embedded data
    python -m benchmarks.epoch_profile                        # every task of params.yaml
    python -m benchmarks.epoch_profile --task detection --epochs 4 --rounds 2   # plain and pipeline in turn, twice
    python -m benchmarks.epoch_profile --short                # a few images per task: well under a minute on 2 cores
    python -m benchmarks.epoch_profile --dataset coco128_json      # a shared real dataset (benchmarks/real_data/)
    python -m benchmarks.epoch_profile --device cuda --dataset trashnet150 \\
        --set tasks.classification.model.name=resnet50 --set tasks.classification.image_size=224

On a shared machine other processes slow both sides unevenly: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from cv_models import get_task
from cv_models.data.cache import CachedDataset
from cv_models.normalize import load_normalizer
from tasks.training import checkpointing, engine
from tasks.cli import parse_overrides
from tasks.config import load_params
from tasks.paths import outputs
from tasks.training.seeding import seed_everything
from tasks.training.train import subset

PARTS = ("data", "mix", "step", "validation", "checkpoint", "logging", "other")
SHORT = {"epochs": 3, "images": 24}  # --short: three epochs (the first left out) of a few images per task


class Clock:
    """Seconds per part, per epoch of the pipeline; an epoch ends when its metrics are logged (fit's last act)."""

    def __init__(self):
        self.epochs: list[dict[str, float]] = [defaultdict(float)]
        self.ends: list[float] = [time.perf_counter()]

    def add(self, part: str, seconds: float) -> None:
        self.epochs[-1][part] += seconds

    def end_epoch(self) -> None:
        self.ends.append(time.perf_counter())
        self.epochs.append(defaultdict(float))

    def timed(self, part: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(part, time.perf_counter() - start)

        return wrapper


class TimedLoader:
    """A DataLoader whose waits for the next batch (worker start-up included) are added to ``data``."""

    def __init__(self, loader, clock: Clock):
        self.loader, self.clock = loader, clock

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # generator, dataset, sampler: the loader's own
        return getattr(self.loader, name)

    def __iter__(self):
        start = time.perf_counter()
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                self.clock.add("data", time.perf_counter() - start)
                return
            self.clock.add("data", time.perf_counter() - start)
            yield batch
            start = time.perf_counter()


@contextlib.contextmanager
def instrumented(task, clock: Clock):
    """tasks.training.engine with its training loader, the checkpoint callback's wait for last.pt (tasks.training.checkpointing's
    save_last) and the task's evaluation timed; put back after."""
    make_loader, save_last, evaluate = engine.make_loader, checkpointing.save_last, task.evaluate

    def timed_loader(task_, dataset, batch_size, shuffle, *args, **kwargs):
        loader = make_loader(task_, dataset, batch_size, shuffle, *args, **kwargs)
        return TimedLoader(loader, clock) if shuffle else loader  # the training loader is the shuffled one

    engine.make_loader, checkpointing.save_last = timed_loader, clock.timed("checkpoint", save_last)
    task.evaluate = clock.timed("validation", evaluate)
    try:
        yield
    finally:
        engine.make_loader, checkpointing.save_last = make_loader, save_last
        del task.evaluate


def normstats_dir(task, cfg, folder: Path) -> Path:
    """The normstats stage's output when there is one, else fixed statistics written to ``folder`` (the time does
    not depend on them), so every task keeps its ``normalization`` without running the stage first."""
    own = outputs(task.name, "normstats")
    if (own / "stats.json").exists():
        return own
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stats.json").write_text(json.dumps({"per_channel_mean": [0.5] * 3, "per_channel_std": [0.25] * 3}))
    np.save(folder / "mean_image.npy", np.full((*cfg.image_hw, 3), 0.5, dtype=np.float32))
    return folder


def spread(data, n: int, seed: int) -> list[int]:
    """``n`` indices spread over ``data`` (every class keeps its share); all of them when n is 0."""
    if not n or n >= len(data):
        return list(range(len(data)))
    return engine.stratified_indices(getattr(data, "labels", None), n, seed, size=len(data))


def datasets(task, cfg, augment: bool, images: int, seed: int) -> dict:
    """The pipeline's train, validation and train-subset sets (as tasks/training/train.py makes them) and the plain
    loop's training set, ``images`` training images and a quarter as many validation images (0: all)."""
    norm = load_normalizer(task.normstats_dir, cfg.normalization)

    def load(split: str, transforms, n: int):
        data = task.dataset(split, transforms)
        if cfg.data.cache != "none":  # decoded and resized once, in memory (disk needs the validate stage's digest)
            data = CachedDataset(
                data, "ram", f"profile-{task.name}-{split}-{cfg.image_size}", cfg.data.cache_max_gb, label=split
            )
        return subset(task, data, spread(data, n, seed))

    train = load("train", task.train_transforms(cfg.augment if augment else None, norm), images)
    val = load("val", task.eval_transforms(norm), images // 4)
    plain = load("train", task.eval_transforms(norm), images)
    train_eval = None
    if (
        cfg.train.track_train_metric
    ):  # tasks/training/train.py: as many unaugmented training images as validation images
        n = min(len(plain), len(val))
        indices = engine.stratified_indices(getattr(plain, "labels", None), n, seed, size=len(plain))
        train_eval = subset(task, plain, indices)
    return {"train": train, "val": val, "train_eval": train_eval, "plain": plain}


def plain_tensors(obj, device: torch.device):
    """A sample as plain tensors on the device (tv_tensors unwrapped: a hand-written loop has none)."""
    if isinstance(obj, torch.Tensor):
        return obj.as_subclass(torch.Tensor).to(device)
    if isinstance(obj, dict):
        return {k: plain_tensors(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_tensors(v, device) for v in obj)
    return obj


def plain_loop(task, cfg, data, seed: int) -> list[float]:
    """Seconds per epoch of a plain loop: samples preloaded on the device, shuffled batches, forward, backward, step."""
    device = engine.pick_device(cfg.train.device)
    engine.set_threads(cfg.train.num_threads)  # the same threads and kernels as fit
    engine.set_determinism(engine.deterministic_kernels(cfg.train.deterministic, device))
    samples = [plain_tensors(data[i], device) for i in range(len(data))]
    seed_everything(seed)
    model = task.build_model().to(device).train()
    t = cfg.train
    steps = max(len(samples) // t.batch_size, 1)  # drop_last, as the pipeline does
    opt = engine.build_optimizer(model, t.optimizer)
    sched = engine.build_scheduler(opt, t, steps)
    times = []
    for _ in range(t.epochs):
        start = time.perf_counter()
        order = torch.randperm(len(samples)).tolist()
        for b in range(steps):
            images, targets = task.collate([samples[i] for i in order[b * t.batch_size : (b + 1) * t.batch_size]])
            loss = task.training_loss(model, images, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss.item()  # the pipeline reads every loss too (finite check, progress)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def pipeline_epochs(task, cfg, sets: dict, augment: bool, seed: int, folder: Path) -> list[dict[str, float]]:
    """Each epoch of tasks.training.engine.fit, in parts (see the module's docstring), with the metrics logged to MLflow."""
    import mlflow

    clock = Clock()
    mixer = task.batch_mixer(cfg.augment if augment else None)
    seed_everything(seed)
    model = task.build_model()

    def log_metrics(metrics: dict, step: int) -> None:  # as tasks/stage.py logs them; fit's last act in an epoch
        start = time.perf_counter()
        clean = {k.replace("/", "."): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        mlflow.log_metrics(clean, step=step)
        clock.add("logging", time.perf_counter() - start)
        clock.end_epoch()

    with instrumented(task, clock), mlflow.start_run(run_name=f"epoch-profile-{task.name}"):
        result = engine.fit(
            task,
            model,
            sets["train"],
            sets["val"],
            cfg.train,
            seed,
            folder / "model.pt",
            checkpoint_path=folder / "last.pt",
            mixer=clock.timed("mix", mixer) if mixer else None,
            log_metrics=log_metrics,
            desc=f"profile/{task.name}",
            train_eval_set=sets["train_eval"],
        )
    return epoch_parts(clock, result.timings["train"])


def epoch_parts(clock: Clock, train_passes: list[float]) -> list[dict[str, float]]:
    """Each finished epoch's parts in seconds, ``step`` and ``other`` as what the timed parts leave, and its total."""
    out = []
    for k, passes in enumerate(train_passes):
        parts = dict(clock.epochs[k])
        total = clock.ends[k + 1] - clock.ends[k]
        parts["step"] = passes - parts.get("data", 0.0) - parts.get("mix", 0.0)
        parts["other"] = total - sum(parts.get(p, 0.0) for p in PARTS if p != "other")
        out.append({p: parts.get(p, 0.0) for p in PARTS} | {"epoch": total, "train_pass": passes})
    return out


def mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def summary(name: str, cfg, sets: dict, rows: list[dict[str, float]], plain_rows: list[float], device: str) -> dict:
    """Means over the measured epochs, the parts' shares and the ratios."""
    seconds = {p: mean(rows, p) for p in PARTS}
    epoch, train_pass, plain_epoch = mean(rows, "epoch"), mean(rows, "train_pass"), sum(plain_rows) / len(plain_rows)
    return {
        "task": name,
        "model": cfg.model.name,
        "image_size": cfg.image_size,
        "batch_size": cfg.train.batch_size,
        "train_images": len(sets["train"]),
        "val_images": len(sets["val"]),
        "device": device,
        "threads": cfg.train.num_threads,
        "workers": engine.worker_count(cfg.train),
        "epochs_measured": len(rows),
        "seconds": seconds,
        "shares": {p: v / epoch for p, v in seconds.items()},
        "epoch": epoch,
        "train_pass": train_pass,
        "plain_epoch": plain_epoch,
        "ratio_epoch": epoch / plain_epoch,
        "ratio_train_pass": train_pass / plain_epoch,
    }


def print_summary(r: dict) -> None:
    print(
        f"\n{r['task']}: {r['model']} at {r['image_size']} px, batch {r['batch_size']}, {r['train_images']} train / "
        f"{r['val_images']} val images, {r['threads']} thread(s), {r['workers']} worker(s), {r['device']}; mean of "
        f"{r['epochs_measured']} epoch(s), each run's first left out"
    )
    print(f"  {'part':<11} {'seconds':>8} {'share':>7}")
    for p in PARTS:
        print(f"  {p:<11} {r['seconds'][p]:8.3f} {100 * r['shares'][p]:6.1f}%")
    print(f"  {'epoch':<11} {r['epoch']:8.3f} {100 * sum(r['shares'].values()):6.1f}%")
    print(f"  plain loop epoch {r['plain_epoch']:.3f} s (preloaded tensors, no augmentation, validation or checkpoint)")
    print(
        f"  ratio pipeline epoch / plain loop = {r['ratio_epoch']:.3f}; training pass / plain loop = "
        f"{r['ratio_train_pass']:.3f}",
        flush=True,
    )


def dataset_overrides(name: str, shared: Path) -> tuple[str, dict]:
    """A shared real dataset's task and settings (benchmarks/real_data/<name>.yaml) without its pretraining: the
    backbone starts from random weights instead, which train at the same speed."""
    from benchmarks.real_data import DATASETS, overlay

    spec = overlay(name, shared)
    pretrained = spec.get("pretrain.out")
    return DATASETS[name], {
        k: "none" if pretrained is not None and v == pretrained else v
        for k, v in spec.items()
        if k not in ("plain", "budget_minutes") and not k.startswith(("pretrain.", "crops."))
    }


def profile(name: str, args, folder: Path) -> dict:
    t = f"tasks.{name}."
    overrides = {
        **args.dataset_overrides,
        **parse_overrides(args.set),
        t + "train.epochs": args.epochs,
        t + "train.resume": False,
    }
    if args.device:
        overrides[t + "train.device"] = args.device
    params = load_params(args.params, overrides)
    cfg = params.task(name)
    task = get_task(name, cfg)
    task.normstats_dir = normstats_dir(task, cfg, folder / name / "normstats")
    sets = datasets(task, cfg, not args.no_augment, args.images, params.seed)
    skip = 1 if args.epochs > 1 else 0  # each run's first epoch carries one-time costs
    epochs, plain = [], []
    for r in range(args.rounds):  # in turn, so that other load on the machine slows both sides alike
        plain += plain_loop(task, cfg, sets["plain"], params.seed)[skip:]
        epochs += pipeline_epochs(task, cfg, sets, not args.no_augment, params.seed, folder / f"{name}{r}")[skip:]
    return summary(name, cfg, sets, epochs, plain, str(engine.pick_device(cfg.train.device)))


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--task", action="append", help="a task of params.yaml (repeatable); default: all of them")
    ap.add_argument(
        "--dataset",
        help="a shared real dataset instead, with its task and settings "
        "(benchmarks/real_data/<name>.yaml, no pretraining), e.g. coco128_json, bccd",
    )
    ap.add_argument(
        "--shared",
        default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"),
        help="folder holding the shared datasets",
    )
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each side; the first is left out of the means")
    ap.add_argument("--rounds", type=int, default=1, help="plain loop and pipeline in turn, this many times")
    ap.add_argument(
        "--images",
        type=int,
        default=0,
        help="training images (spread over the split; validation gets a quarter as many); 0 = all",
    )
    ap.add_argument("--short", action="store_true", help=f"{SHORT['epochs']} epochs of {SHORT['images']} images a task")
    ap.add_argument("--device", help="cpu | cuda | cuda:N (default: the params' train.device)")
    ap.add_argument("--no-augment", action="store_true", help="the baseline stage's epoch (no augmentation)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a params value")
    ap.add_argument(
        "--tracking-uri",
        help="MLflow store the epochs log to (default: $MLFLOW_TRACKING_URI, else a temporary SQLite store)",
    )
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    args.dataset_overrides = {}
    if args.dataset:
        task, args.dataset_overrides = dataset_overrides(args.dataset, Path(args.shared).resolve())
        args.task = [task]
    if args.short:
        args.epochs, args.images = SHORT["epochs"], args.images or SHORT["images"]
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    import mlflow

    args = parse_args(argv)
    names = args.task or list(load_params(args.params).tasks)
    results = []
    with tempfile.TemporaryDirectory(prefix="epoch-profile-") as tmp:
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{tmp}/mlflow.db"
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("epoch-profile")
        for name in names:
            results.append(profile(name, args, Path(tmp)))
            print_summary(results[-1])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
