"""The training loop shared by every task: optimiser, schedule with warmup, best checkpoint on the
validation metric, a resumable last checkpoint, per-epoch metrics to MLflow and a progress bar."""

from __future__ import annotations

import hashlib
import inspect
import io
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cv_models.base import CVTask
from cv_models.settings import flat
from tasks.config import TrainConfig, config_hash
from tasks.paths import atomic_write_bytes
from tasks.training import accelerate, budget, callbacks, checkpointing, device, optim
from tasks.training.checkpointing import CheckpointError, read_resume_checkpoint, save_last, write_checkpoint  # noqa: F401
from tasks.training.device import (  # noqa: F401
    available_cores,
    deterministic_kernels,
    pick_device,
    prepare_device,
    set_determinism,
    set_threads,
    warn_slow_deterministic_roi,
    worker_count,
)
from tasks.training.diagnostics import (  # noqa: F401
    DUMMY_MARGIN,
    NO_OVERFITTING,
    SilentFailureWarning,
    diagnose_overfitting,
    overfitting_verdict,
    silent_failure_warnings,
)
from tasks.training.optim import build_optimizer, build_scheduler, make_scheduler, parameter_groups  # noqa: F401
from tasks.training.seeding import loader_generator, seed_worker


class OverfitCheckFailed(RuntimeError):
    pass


def make_loader(
    task: CVTask,
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    sampler=None,
    pin_memory: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        num_workers=num_workers,
        collate_fn=task.collate,
        generator=loader_generator(seed),
        worker_init_fn=seed_worker,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        sampler=sampler,
        pin_memory=pin_memory,
    )


def to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def task_sources(task: CVTask) -> set[str]:
    """The files of the task's code: every module of its package when it is one (``cv_models/<task>/``), else its
    own module."""
    module = sys.modules[type(task).__module__]
    package = sys.modules.get(module.__name__.rpartition(".")[0]) if not hasattr(module, "__path__") else module
    if package is not None and getattr(package, "__file__", None) and package.__name__.startswith("cv_models."):
        return {str(p) for p in sorted(Path(package.__file__).parent.glob("*.py"))}
    return {inspect.getfile(type(task))}


def code_version(task: CVTask) -> str:
    """sha256 of the task's code and of this training loop: changed code never resumes old state."""
    h = hashlib.sha256()
    loop = {__file__, budget.__file__, callbacks.__file__, device.__file__, optim.__file__}
    for path in sorted(task_sources(task) | loop):
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def resume_settings(task: CVTask, cfg: TrainConfig) -> dict:
    """All of the task's settings (and the training settings ``fit`` got) that a resumed run must share. Left out:
    ``train.resume`` (whether to resume, not what is trained) and ``data.cache`` (the same samples either way);
    ``train.num_workers`` as the number it resolved to (the augmentation stream depends on it, not on how it was chosen)."""
    settings = {"task": task.cfg.model_dump(mode="json"), "train": cfg.model_dump(mode="json")}
    for section in (settings["task"].get("train", {}), settings["train"]):  # a bare task may have no train section
        for key in ("resume", "checkpoint_every", "checkpoint_background"):  # how it is kept, not what is trained
            section.pop(key, None)
        section["num_workers"] = worker_count(cfg)
    for key in ("cache", "cache_max_gb"):
        settings["task"].get("data", {}).pop(key, None)
    return settings


def fingerprint_parts(
    task: CVTask, cfg: TrainConfig, seed: int, extra_state: dict | None, n_train: int, data_version: str | None
) -> dict:
    """What must be equal for a checkpoint to continue this run, part by part (so a mismatch can say which);
    the settings are :func:`resume_settings`."""
    return {
        "settings": config_hash(resume_settings(task, cfg)),
        "seed": str(seed),
        "code": code_version(task),
        "data": data_version or "unknown",
        "stage": config_hash(extra_state or {}),
        "n_train": str(n_train),
    }


@dataclass
class FitResult:
    history: pd.DataFrame
    best_epoch: int
    best_metrics: dict[str, float]
    seconds: float
    # wall-clock seconds per epoch: "train" (the training pass of each epoch run here, resumed ones included),
    # "val" (each validation pass: validation split and train subset)
    timings: dict[str, list[float]] = field(default_factory=lambda: {"train": [], "val": []})
    planned: int = 0  # the epochs planned in the end: train.epochs, or those that fitted the time limit
    final_lr: float = float("nan")  # the learning rate after the last epoch trained
    end_lr: float | None = None  # where the schedule ends (with a fitted time limit): final_lr should be it
    time_limit_s: float = 0.0  # train.time_limit_minutes in seconds (0: none)


def fit(
    task: CVTask,
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    cfg: TrainConfig,
    seed: int,
    model_path: Path,
    checkpoint_path: Path | None = None,
    mixer: Callable | None = None,
    log_metrics: Callable[[dict, int], None] | None = None,
    desc: str = "train",
    extra_state: dict | None = None,
    train_eval_set: Dataset | None = None,
    data_version: str | None = None,
    keep_checkpoint: bool = False,
) -> FitResult:
    """Train for ``cfg.epochs``; keep the weights with the best validation ``task.primary_metric``, written to
    ``model_path`` once, at the end. ``checkpoint_path`` holds the last epoch so an interrupted run resumes, only
    when it was made by the same run (:func:`fingerprint_parts`; read with ``weights_only=True``). With
    ``keep_checkpoint`` the finished run's checkpoint stays, marked done, for the caller to remove once its outputs
    are committed. ``train_eval_set`` (training images without augmentation) is scored each epoch beside the
    validation split, for the overfitting diagnosis. Everything beside the training step and validation is a
    callback (tasks/training/callbacks.py, :func:`default_callbacks`): EMA, checkpoint, time limit, early stopping."""
    dev, acc = prepare_device(cfg, model, desc)
    loaders = make_loaders(task, train_set, val_set, train_eval_set, cfg, seed, acc.pin_memory, desc)
    run = new_run(task, model, cfg, desc, loaders.train)
    train_model = acc.prepare(model)  # what the training step calls: channels-last, DDP (rank 0's weights), compiled
    parts = fingerprint_parts(task, cfg, seed, extra_state, len(train_set), data_version)
    hooks = default_callbacks(task, cfg, seed, dev, checkpoint_path, keep_checkpoint, log_metrics, parts)
    callbacks.call(hooks, "on_fit_start", run)
    run.t0 = run.clock() - run.elapsed
    callbacks.call(hooks, "on_train_start", run)
    while run.epoch <= run.planned:
        train_epoch(run, task, train_model, acc, dev, loaders.sampler, mixer, hooks)
        run.due = run.epoch % cfg.val_every == 0 or run.epoch == run.planned
        callbacks.call(hooks, "on_train_end", run)  # the time limit: is this the last epoch (then validated)?
        run.val = validate(run, task, acc, dev, loaders) if run.due or run.out else None
        record_epoch(run)
        callbacks.call(hooks, "on_epoch_end", run)
        if run.stop:
            break
        run.epoch += 1
    callbacks.call(hooks, "on_fit_end", run)
    return finish(run, task, model_path, hooks)


def new_run(task: CVTask, model: nn.Module, cfg: TrainConfig, desc: str, train_loader: DataLoader) -> callbacks.Run:
    """The loop's shared state: the optimiser, then the schedule over ``cfg.epochs`` of ``train_loader``'s steps."""
    optimizer = build_optimizer(model, cfg.optimizer, task.lr_factor)
    scheduler = make_scheduler(optimizer, cfg, len(train_loader))
    return callbacks.Run(
        cfg,
        desc,
        task.primary_metric,
        model,
        optimizer,
        scheduler,
        train_loader,
        time.perf_counter,
        scored=model,
        planned=cfg.epochs,
    )


def finish(run: callbacks.Run, task: CVTask, model_path: Path, hooks: list[callbacks.Callback]) -> FitResult:
    """The best weights loaded and saved (rank 0), and what the run gives back."""
    seconds = run.spent()
    run.scored.load_state_dict(run.best["state"])
    if accelerate.is_main():
        save_model(
            model_path, run.best["state"], task, extra={"epoch": run.best["epoch"], "val_metrics": run.best["metrics"]}
        )
    callbacks.call(hooks, "on_saved", run)
    return FitResult(
        pd.DataFrame(run.history),
        run.best["epoch"],
        run.best["metrics"],
        seconds,
        run.timings,
        planned=run.planned,
        final_lr=float(run.history[-1]["lr"]) if run.history else float("nan"),
        end_lr=run.scheduler.end_lr if isinstance(run.scheduler, budget.FittedSchedule) else None,
        time_limit_s=run.cfg.time_limit_minutes * 60,
    )


def default_callbacks(
    task: CVTask,
    cfg: TrainConfig,
    seed: int,
    device: torch.device,
    checkpoint_path: Path | None,
    keep_checkpoint: bool,
    log_metrics: Callable[[dict, int], None] | None,
    parts: dict,
) -> list[callbacks.Callback]:
    """The callbacks ``fit`` runs, in their order: the EMA first (a resume restores it), the best weights and the
    time limit's refit before the checkpoint (which keeps them), logging after it (an interruption there loses no
    epoch), early stopping last."""
    if accelerate.world_size() > 1:
        parts["processes"] = accelerate.world_size()
    settings = flat(resume_settings(task, cfg))  # kept in the checkpoint, so a refused resume can name each change
    background = checkpointing.in_background(cfg.checkpoint_background, device)
    hooks: list[callbacks.Callback] = [callbacks.EMA(cfg.ema_decay)] if cfg.ema_decay > 0 else []
    hooks.append(callbacks.EncoderSchedule(task.before_epoch))  # freeze_encoder_epochs (a no-op without an encoder)
    hooks.append(callbacks.BestWeights(cfg.early_stopping.min_delta))
    checkpoint = callbacks.Checkpoint(checkpoint_path, config_hash(parts), parts, settings, keep_checkpoint, background)
    hooks += [callbacks.TimeLimit(), checkpoint] if cfg.time_limit_minutes else [checkpoint]
    hooks += [callbacks.MetricsLog(log_metrics)] if log_metrics is not None else []
    hooks += [callbacks.EarlyStopping(cfg.early_stopping.patience)] if cfg.early_stopping.enabled else []
    return hooks


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    train_eval: DataLoader | None  # the training images without augmentation (train.track_train_metric)
    sampler: Any  # torchrun's DistributedSampler of the training set, else None


def make_loaders(
    task: CVTask,
    train_set: Dataset,
    val_set: Dataset,
    train_eval_set: Dataset | None,
    cfg: TrainConfig,
    seed: int,
    pin: bool,
    desc: str,
) -> Loaders:
    # under torchrun each process takes its share of the global batch from a DistributedSampler
    sampler = accelerate.train_sampler(train_set, seed)
    workers = worker_count(cfg)
    print(
        f"[{desc}] {workers} DataLoader worker(s) (train.num_workers={cfg.num_workers}, {available_cores()} cores, "
        f"{cfg.num_threads or available_cores()} torch thread(s))",
        flush=True,
    )
    return Loaders(
        make_loader(
            task,
            train_set,
            accelerate.local_batch_size(cfg.batch_size),
            True,
            seed,
            workers,
            drop_last=len(train_set) > cfg.batch_size,
            sampler=sampler,
            pin_memory=pin,
        ),
        make_loader(task, val_set, cfg.eval_batch_size, False, seed, workers, pin_memory=pin),
        make_loader(task, train_eval_set, cfg.eval_batch_size, False, seed, workers, pin_memory=pin)
        if train_eval_set is not None and cfg.track_train_metric
        else None,
        sampler,
    )


def train_epoch(
    run: callbacks.Run,
    task: CVTask,
    train_model: nn.Module,
    acc: accelerate.Accelerator,
    device: torch.device,
    sampler,
    mixer: Callable | None,
    hooks: list[callbacks.Callback],
) -> None:
    """One pass over the training set; its time to ``run.timings`` and its row (loss, lr) to ``run.row``."""
    train_model.train()
    callbacks.call(hooks, "on_epoch_start", run)
    if sampler is not None:
        sampler.set_epoch(run.epoch)  # a new shuffle each epoch, the same on every rank
    loss_sum, n_batches = 0.0, 0
    epoch_start = run.clock()
    bar = tqdm(
        run.train_loader,
        desc=f"[{run.desc}] epoch {run.epoch}/{run.planned}",
        leave=False,
        mininterval=1.0,
        dynamic_ncols=True,
        disable=None,
    )  # shown on a terminal, silent in logs
    for images, targets in bar:
        images, targets = to_device(images, device), to_device(targets, device)
        if mixer is not None:
            images, targets = mixer(images, targets)
        with acc.autocast():
            loss = task.training_loss(train_model, acc.images(images), targets)
        loss = loss.float()  # the loss and its scaling in fp32 under mixed precision
        run.optimizer.zero_grad(set_to_none=True)
        acc.backward_step(loss, run.optimizer, run.model.parameters(), run.cfg.grad_clip_norm)
        run.scheduler.step()
        callbacks.call(hooks, "on_batch_end", run)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"[{run.desc}] loss became {value} at epoch {run.epoch}; lower optimizer.lr")
        loss_sum += value
        n_batches += 1
        if not bar.disable:
            bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}", refresh=False)
        if n_batches == run.cut and run.epoch == run.planned:
            break  # the time limit's guard ends training here
    run.timings["train"].append(run.clock() - epoch_start)
    run.row = {
        "epoch": run.epoch,
        "train_loss": accelerate.mean_across_ranks(loss_sum / max(n_batches, 1)),
        "lr": run.optimizer.param_groups[0]["lr"],
    }
    if n_batches < run.steps_per_epoch:
        run.row["steps"] = n_batches  # a partial epoch


def validate(
    run: callbacks.Run, task: CVTask, acc: accelerate.Accelerator, device: torch.device, loaders: Loaders
) -> dict:
    """The validation metrics of ``run.scored`` (and the training subset's beside them, into ``run.row``): scored on
    rank 0 and broadcast (every rank holds the same weights), under the training autocast."""
    val_start = run.clock()
    with acc.autocast():
        val = accelerate.broadcast(
            task.evaluate(run.scored, loaders.val, device).metrics if accelerate.is_main() else None
        )
    if loaders.train_eval is not None:
        with acc.autocast():
            plain = accelerate.broadcast(
                task.evaluate(run.scored, loaders.train_eval, device).metrics if accelerate.is_main() else None
            )
        run.row[f"train_{run.metric}"] = plain[run.metric]
        if "loss" in plain:
            run.row["train_loss_plain"] = plain["loss"]
    run.row.update({f"val_{k}": v for k, v in val.items()})
    run.timings["val"].append(run.clock() - val_start)
    return val


def record_epoch(run: callbacks.Run) -> None:
    """The epoch's row into the history (plain numbers: the checkpoint stays loadable with weights_only=True)."""
    run.row = callbacks.plain_numbers(run.row)
    run.history.append(run.row)
    val, metric = run.val, run.metric
    print(
        f"[{run.desc}] epoch {run.epoch}/{run.planned} train_loss={run.row['train_loss']:.4f}"
        + (
            f" val_{metric}={val[metric]:.4f}" + (f" val_loss={val['loss']:.4f}" if "loss" in val else "")
            if val is not None
            else f" (validated every {run.cfg.val_every} epochs)"
        )
        + (f" (partial: {run.row['steps']} of {run.steps_per_epoch} steps)" if run.partial() else ""),
        flush=True,
    )


@torch.no_grad()
def measure_speed(
    model: nn.Module, loader: DataLoader, device: torch.device, latency_repeats: int = 10
) -> dict[str, float]:
    """Inference throughput (images/s at the loader's batch size) and the latency of one image (median, ms)."""
    model.eval()
    n, start = 0, time.perf_counter()
    first = None
    for images, _ in loader:
        images = to_device(images, device)
        first = images[:1] if first is None else first
        model(images)
        n += len(images)
    throughput = n / max(time.perf_counter() - start, 1e-9)
    latencies = []
    for _ in range(latency_repeats):
        t = time.perf_counter()
        model(first)
        latencies.append(time.perf_counter() - t)
    return {"images_per_second": throughput, "latency_ms": 1000 * float(pd.Series(latencies).median())}


def save_model(path: Path, state: dict, task: CVTask, extra: dict | None = None) -> None:
    buf = io.BytesIO()
    torch.save(
        {
            "model": state,
            "task": task.name,
            "class_names": task.class_names(),
            "config": task.cfg.model_dump(mode="json"),
            **(extra or {}),
        },
        buf,
    )
    atomic_write_bytes(Path(path), buf.getvalue())


def load_model(task: CVTask, path: Path) -> nn.Module:
    """Rebuild the task's model and load the weights a training stage saved (weights only: no pickle code)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    # the saved weights replace any initial weights, so build without loading those again
    model = type(task).for_saved_weights(task.cfg).build_model()
    model.load_state_dict(blob["model"])
    return model.eval()


def stratified_indices(labels: list | None, n: int, seed: int, size: int | None = None) -> list[int]:
    """``n`` seeded indices of a dataset, each class represented in proportion to its share (at least one
    per class while ``n`` allows), so that a sorted folder listing does not give a one-class subset.
    Without labels (detection, segmentation): a seeded random sample of ``size`` items."""
    import numpy as np

    rng = np.random.default_rng(seed)
    total = len(labels) if labels is not None else int(size or 0)
    if n >= total:
        return list(range(total))
    if labels is None:
        return sorted(rng.choice(total, size=n, replace=False).tolist())
    by_class: dict = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    quota = {y: max(1, int(n * len(idx) / total)) for y, idx in by_class.items()}
    while sum(quota.values()) > n:  # more classes than n: drop from the biggest quotas
        quota[max(quota, key=quota.get)] -= 1
    leftovers = []
    picked = []
    for y, idx in by_class.items():
        order = rng.permutation(idx).tolist()
        picked += order[: quota[y]]
        leftovers += order[quota[y] :]
    picked += rng.permutation(leftovers).tolist()[: n - len(picked)]  # rounding remainder, drawn at random
    return sorted(picked)


def overfit_one_batch(
    task: CVTask,
    model: nn.Module,
    batch,
    steps: int,
    lr: float,
    device: torch.device,
    done: Callable[[list[float]], bool] | None = None,
) -> list[float]:
    """Train on one fixed batch; a healthy model and loss drive the loss towards zero. ``done(losses)``
    ends the run early (the check has already passed)."""
    model.to(device).train()
    images, targets = to_device(batch[0], device), to_device(batch[1], device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = task.training_loss(model, images, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if done is not None and done(losses):
            break
    return losses
