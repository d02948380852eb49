"""The training loop shared by every task: optimiser, schedule with warmup, best checkpoint on the
validation metric, a resumable last checkpoint, per-epoch metrics to MLflow and a progress bar."""
from __future__ import annotations

import copy
import hashlib
import inspect
import io
import math
import os
import pickle
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cv_models.base import CVTask
from cv_models.settings import diff_text, flat
from tasks import accelerate, budget, checkpointing
from tasks.config import OptimizerConfig, TrainConfig, config_hash
from tasks.paths import atomic_write_bytes
from tasks.seeding import loader_generator, seed_worker


class OverfitCheckFailed(RuntimeError):
    pass


class CheckpointError(RuntimeError):
    """A resume checkpoint that cannot be trusted or used (the message names the file and the rule)."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and accelerate.launched_by_torchrun():
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per torchrun process
    return torch.device(name)


def set_threads(n: int) -> None:
    torch.set_num_threads(n or os.cpu_count() or 1)


def deterministic_kernels(setting: bool | str, device: torch.device) -> bool:
    """``train.deterministic`` for this device. ``auto``: on the CPU (it costs nothing there and gives bit-equal
    reruns), off on a GPU, where deterministic kernels cost speed and, for Faster/Mask R-CNN, much more: with
    deterministic algorithms on, torchvision's roi_align leaves its CUDA kernel for a pure-Python version
    (an epoch of Mask R-CNN on coco128_json took 104 s on an H200, against 7 s with them off; README "Run on an
    NVIDIA H200")."""
    return device.type == "cpu" if setting == "auto" else bool(setting)


def set_determinism(on: bool) -> None:
    """Deterministic kernels where torch has them (warn-only: an op without one still runs, with a warning),
    cuDNN without autotuning; off: torch picks the fastest kernels and cuDNN autotunes (as torchvision's
    reference scripts do)."""
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read when CUDA starts)


def warn_slow_deterministic_roi(model: nn.Module, device: torch.device, deterministic: bool, desc: str) -> None:
    """Say so when ``train.deterministic: true`` sends a GPU detector's RoI pooling down torchvision's slow path."""
    from torchvision.ops import MultiScaleRoIAlign

    if deterministic and device.type != "cpu" and any(isinstance(m, MultiScaleRoIAlign) for m in model.modules()):
        print(f"[{desc}] WARNING: train.deterministic: true on {device.type} makes torchvision's roi_align use its "
              f"pure-Python version (Mask R-CNN epochs measured 15x slower on an H200); set "
              f"train.deterministic: auto or false to train at the GPU's speed", flush=True)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share), else all of them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(cfg: TrainConfig, cores: int | None = None) -> int:
    """``train.num_workers`` as a number. ``auto``: none on 2 cores or fewer, where a worker process competes with
    training for the same cores and costs more than it saves (benchmarks/epoch_time.py measured it); otherwise the
    cores torch's threads leave free, at most 8."""
    if cfg.num_workers != "auto":
        return cfg.num_workers
    cores = cores or available_cores()
    if cores <= 2:
        return 0
    threads = cfg.num_threads or cores
    return max(0, min(cores - threads, 8))


def make_loader(task: CVTask, dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0,
                drop_last: bool = False, sampler=None, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, num_workers=num_workers, collate_fn=task.collate,
        generator=loader_generator(seed), worker_init_fn=seed_worker, drop_last=drop_last,
        persistent_workers=num_workers > 0, sampler=sampler, pin_memory=pin_memory,
    )


def parameter_groups(model: nn.Module, cfg: OptimizerConfig, lr_factor: Callable[[str], float] | None = None) -> list[dict]:
    """Weight decay on weights only: norm layers' scales and all biases (1-d tensors) are not decayed,
    since shrinking them regularises nothing and hurts normalisation. ``lr_factor(name)``: a parameter's learning
    rate as a fraction of ``cfg.lr`` (a pretrained encoder's, model.encoder_lr_factor); each factor its own groups."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    factors = {n: lr_factor(n) if lr_factor else 1.0 for n, _ in trainable}
    groups = []
    for f in sorted(set(factors.values()), reverse=True):  # factor 1 (the new layers) first: the logged lr is theirs
        mine = [(n, p) for n, p in trainable if factors[n] == f]
        extra = {} if f == 1.0 else {"lr": cfg.lr * f, "lr_factor": f}
        if cfg.decay_norms_and_biases:
            groups.append({"params": [p for _, p in mine], "weight_decay": cfg.weight_decay, **extra})
            continue
        groups += [{"params": [p for _, p in mine if p.ndim > 1], "weight_decay": cfg.weight_decay, **extra},
                   {"params": [p for _, p in mine if p.ndim <= 1], "weight_decay": 0.0, **extra}]
    return groups


OPTIMIZERS = {
    "sgd": lambda groups, c: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.momentum > 0),
    "adam": lambda groups, c: torch.optim.Adam(groups, lr=c.lr),
    "adamw": lambda groups, c: torch.optim.AdamW(groups, lr=c.lr),
}


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr_factor: Callable[[str], float] | None = None) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](parameter_groups(model, cfg, lr_factor), cfg)


def build_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step schedule: linear warmup then step / cosine; one-cycle has its own warmup."""
    s, total = cfg.scheduler, cfg.epochs * steps_per_epoch
    warmup = min(s.warmup_epochs * steps_per_epoch, max(total - 1, 0))
    sched = torch.optim.lr_scheduler
    if s.name == "onecycle":
        if total < 4:  # too few steps for a ramp up and down (e.g. one epoch of one batch): constant lr
            return sched.LambdaLR(optimizer, lambda _: 1.0)
        pct = warmup / total if warmup else 0.3
        # at least two steps in each phase, or OneCycleLR divides by zero
        max_lr = [cfg.optimizer.lr * g.get("lr_factor", 1.0) for g in optimizer.param_groups]
        return sched.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total,
                                pct_start=min(max(pct, 2.5 / total), 1 - 2.5 / total))
    if s.name == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1))
    elif s.name == "step":
        main = sched.StepLR(optimizer, step_size=s.step_size * steps_per_epoch, gamma=s.gamma)
    else:
        main = sched.LambdaLR(optimizer, lambda _: 1.0)
    if not warmup:
        return main
    if s.warmup == "constant":
        ramp = sched.ConstantLR(optimizer, factor=0.1, total_iters=warmup)
    else:
        ramp = sched.LinearLR(optimizer, start_factor=1e-2, total_iters=warmup)
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


PART_NAMES = {"settings": "the task's settings", "seed": "the seed", "code": "the task's code, tasks/engine.py or tasks/budget.py",
              "data": "the data version (validate stage's digest)", "stage": "the stage's own settings",
              "n_train": "the number of training samples"}


def code_version(task: CVTask) -> str:
    """sha256 of the task's module and of this training loop: changed code never resumes old state."""
    h = hashlib.sha256()
    for path in sorted({inspect.getfile(type(task)), __file__, budget.__file__}):
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


def fingerprint_parts(task: CVTask, cfg: TrainConfig, seed: int, extra_state: dict | None, n_train: int,
                      data_version: str | None) -> dict:
    """What must be equal for a checkpoint to continue this run, part by part (so a mismatch can say which);
    the settings are :func:`resume_settings`."""
    return {"settings": config_hash(resume_settings(task, cfg)), "seed": str(seed), "code": code_version(task),
            "data": data_version or "unknown", "stage": config_hash(extra_state or {}), "n_train": str(n_train)}


def changed_settings(old: dict, new: dict) -> str:
    """Every setting that differs between two flat :func:`resume_settings`, with its old and new value."""
    diff: dict[str, tuple] = {}
    for key in sorted(set(old) | set(new), key=lambda k: (not k.startswith("task."), k)):  # the task's keys first, by name
        shown = key.removeprefix("task.")  # fit's own train settings keep their "train." prefix
        if old.get(key) != new.get(key) and shown not in diff:
            diff[shown] = (old.get(key), new.get(key))
    return diff_text(diff)


def resume_mismatch(ck: dict, differs: list[str], settings: dict) -> str:
    """Why a checkpoint does not continue this run: each differing part, the settings by key (old -> new)."""
    if not ck.get("fingerprint_parts"):
        return "it was written by an older version of the pipeline"
    named = [f"{PART_NAMES[k]} ({changed_settings(ck['settings'], settings)})" if k == "settings" and ck.get("settings")
             else f"{k} ({PART_NAMES[k]})" for k in differs]
    return ", ".join(named) + (" differs" if len(differs) == 1 else " differ") + " from this run"


def plain_numbers(d: dict) -> dict:
    """numpy / tensor scalars as Python floats and ints (the only numbers weights_only loads without help)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, bool) or isinstance(v, (int, float, str)) or v is None:
            out[k] = v
        elif hasattr(v, "item"):
            out[k] = v.item()
        else:
            out[k] = v
    return out


def get_rng_states() -> dict:
    """torch, Python and numpy generators as tensors and plain containers (weights_only can load them)."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_py = random.getstate()
    return {"torch": torch.get_rng_state(), "python": [version, list(state), gauss_py],
            "numpy": [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)]}


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
        reason = " ".join(ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation")))
        raise CheckpointError(
            f"{path}: refused to resume from this checkpoint (rule: resume checkpoints load with weights_only=True, "
            f"holding tensors and plain containers only; {type(err).__name__}: {reason or ' '.join(lines)}). Nothing "
            f"was run from it and nothing else was changed; delete the file to start this stage afresh.") from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path}: not a resume checkpoint (rule: a dict written by tasks/engine.py); delete it "
                              f"to start this stage afresh")
    return ck


def write_checkpoint(path: Path, state: dict) -> None:
    """``state`` serialised whole, then written atomically: a kill mid-write leaves the previous file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def save_last(path: Path, state: dict, writer: checkpointing.BackgroundWriter | None) -> None:
    """What the training loop waits for to keep ``last.pt``: the whole write, or with a background writer a copy
    of the state to the CPU (benchmarks/epoch_profile.py times this call)."""
    if writer is None:
        write_checkpoint(path, state)
    else:
        writer.submit(path, state)


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


def schedule_table(cfg: TrainConfig, steps_per_epoch: int) -> tuple[list[float], list[float | None]]:
    """The configured schedule's learning rate and momentum (one-cycle cycles it) at each of its steps: torch's
    scheduler (:func:`build_scheduler`) stepped on a throwaway optimizer of the same kind."""
    import warnings

    optimizer = OPTIMIZERS[cfg.optimizer.name]([{"params": [nn.Parameter(torch.zeros(1))]}], cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    lrs, momenta = [], []
    with warnings.catch_warnings():  # stepping without optimizer steps in between is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(cfg.epochs * steps_per_epoch):
            group = optimizer.param_groups[0]
            lrs.append(group["lr"])
            momenta.append(group["betas"][0] if "betas" in group else group.get("momentum"))
            scheduler.step()
    return lrs, momenta


def make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """torch's scheduler (:func:`build_scheduler`); with a time limit that the epochs are fitted to, the same schedule
    as a :class:`budget.FittedSchedule`, which the plan re-spans as it moves."""
    if cfg.time_limit_minutes and cfg.fit_epochs_to_time_limit:
        lrs, momenta = schedule_table(cfg, steps_per_epoch)
        return budget.FittedSchedule(optimizer, lrs, momenta, len(lrs))
    return build_scheduler(optimizer, cfg, steps_per_epoch)


def time_budget(cfg: TrainConfig, timings: dict[str, list[float]]) -> budget.TimeBudget | None:
    """The run's time limit (None without one); the timings already there were measured by an interrupted run."""
    if not cfg.time_limit_minutes:
        return None
    return budget.TimeBudget(cfg.time_limit_minutes * 60, cfg.epochs, cfg.val_every, len(timings["train"]),
                             len(timings["val"]))


def refit_on_resume(scheduler, cfg: TrainConfig, planned: int, elapsed: float, steps_per_epoch: int, desc: str) -> int:
    """A resumed run's plan: the one the interrupted run fitted (perhaps under other load) is dropped; the schedule
    spans the cap again until this process has timed an epoch, and the plan is then re-fitted from the time left."""
    scheduler.respan(cfg.epochs * steps_per_epoch)
    print(f"[{desc}] time limit: resuming with {max(cfg.time_limit_minutes * 60 - elapsed, 0):.0f} s of "
          f"train.time_limit_minutes={cfg.time_limit_minutes:g} left; the plan of {planned} epochs fitted before the "
          f"interruption is dropped and re-fitted from the time left after this process's first epoch", flush=True)
    return cfg.epochs


def follow_plan(time_limit: budget.TimeBudget, scheduler, planned: int, epoch: int, spent: float,
                timings: dict[str, list[float]], steps_per_epoch: int, desc: str) -> int:
    """After ``epoch``: the epochs that fit now (rank 0's count); when that moved, the schedule re-spanned over them."""
    fits = accelerate.broadcast(time_limit.plan(spent, epoch, timings))
    if fits != planned:
        scheduler.respan(fits * steps_per_epoch)
        print(f"[{desc}] time limit: {fits} of {time_limit.cap} epochs fit ({time_limit.describe(timings)}); the "
              f"learning-rate schedule now spans {fits} (train.fit_epochs_to_time_limit)", flush=True)
    return fits


def say_out_of_time(time_limit: budget.TimeBudget, epoch: int, planned: int, spent: float,
                    timings: dict[str, list[float]], desc: str) -> None:
    train_s, val_s = time_limit.estimates(timings)
    print(f"[{desc}] time limit: stopping after epoch {epoch} of {planned} ({spent:.0f} s spent; another epoch "
          f"({train_s:.0f} s, plus {val_s:.0f} s of validation: medians of the last {budget.RECENT_EPOCHS}) would pass "
          f"train.time_limit_minutes={time_limit.limit_s / 60:g})", flush=True)


class SilentFailureWarning(UserWarning):
    """A trained model no better than the dummy solution, collapsed to one class, or never predicting some."""


DUMMY_MARGIN = 0.01  # a metric within this of the dummy's has learnt nothing the class frequencies do not give


def silent_failure_warnings(metrics: dict, dummy: dict, primary: str, n_classes: int, where: str) -> list[str]:
    """Lines saying a model is no better than the dummy solution, predicts a single class, or never predicts some
    classes present in the data (``never_predicted/<class>`` metrics; empty: healthy). A collapsed model otherwise
    passes every stage quietly, its metric looking like a number."""
    out = []
    if primary in metrics and primary in dummy and metrics[primary] <= dummy[primary] + DUMMY_MARGIN:
        out.append(f"{where}: {primary} {metrics[primary]:.4f} is at the dummy solution's level ({dummy[primary]:.4f}): "
                   f"the model has learnt nothing beyond the class frequencies (check the learning rate, the epochs, "
                   f"class balance and the labels)")
    missed = [k.split("/", 1)[1] for k in metrics if k.startswith("never_predicted/")]
    if n_classes > 1 and metrics.get("predicted_classes") == 1:
        out.append(f"{where}: the model predicts a single class for everything (collapsed; try class weights or a "
                   f"Dice-based loss for rare classes, a lower learning rate, more epochs)")
    elif missed:
        out.append(f"{where}: {len(missed)} of {n_classes} classes present in the data are never predicted: "
                   f"{', '.join(missed)} (half-collapsed; try class weights or a Dice-based loss for rare classes, "
                   f"more epochs)")
    return out


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
    """Train for ``cfg.epochs``; keep the weights with the best validation ``task.primary_metric``.

    The best model goes to ``model_path`` (written once, at the end). ``checkpoint_path`` holds the
    last epoch so an interrupted run resumes; it is used only if it was made by the same run: the task's settings,
    the seed, the code of the task and of this loop, and ``data_version`` (the validate stage's digest), see
    :func:`fingerprint_parts`. It is read with ``weights_only=True``: a file holding pickled code is refused.
    With ``keep_checkpoint`` the finished run's checkpoint stays, marked done, for the caller to remove once its
    outputs are committed: a kill in between then resumes without training again.
    ``train_eval_set`` (training images without augmentation) is scored each epoch beside the
    validation split, for the overfitting diagnosis. With ``cfg.ema_decay`` the exponential moving
    average of the weights is what gets scored and saved.
    """
    device = pick_device(cfg.device)
    set_threads(cfg.num_threads)
    deterministic = deterministic_kernels(cfg.deterministic, device)
    set_determinism(deterministic)
    warn_slow_deterministic_roi(model, device, deterministic, desc)
    model.to(device)
    acc = accelerate.Accelerator(device, cfg.precision, cfg.channels_last, cfg.compile)
    # under torchrun each process takes its share of the global batch from a DistributedSampler
    sampler = accelerate.train_sampler(train_set, seed)
    pin = acc.pin_memory
    workers = worker_count(cfg)
    print(f"[{desc}] {workers} DataLoader worker(s) (train.num_workers={cfg.num_workers}, {available_cores()} cores, "
          f"{cfg.num_threads or available_cores()} torch thread(s))", flush=True)
    train_loader = make_loader(task, train_set, accelerate.local_batch_size(cfg.batch_size), True, seed, workers,
                               drop_last=len(train_set) > cfg.batch_size, sampler=sampler, pin_memory=pin)
    val_loader = make_loader(task, val_set, cfg.eval_batch_size, False, seed, workers, pin_memory=pin)
    train_eval_loader = (make_loader(task, train_eval_set, cfg.eval_batch_size, False, seed, workers, pin_memory=pin)
                         if train_eval_set is not None and cfg.track_train_metric else None)
    # a CVTask's hooks for a pretrained encoder (a duck-typed task without them trains everything alike)
    before_epoch = getattr(task, "before_epoch", lambda model, epoch: None)
    optimizer = build_optimizer(model, cfg.optimizer, getattr(task, "lr_factor", None))
    scheduler = make_scheduler(optimizer, cfg, len(train_loader))
    train_model = acc.prepare(model)  # what the training step calls: channels-last, DDP (rank 0's weights), compiled
    ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay),
                                                use_buffers=True) if cfg.ema_decay > 0 else None)
    scored = ema.module if ema is not None else model  # the weights that are evaluated and saved
    parts = fingerprint_parts(task, cfg, seed, extra_state, len(train_set), data_version)
    settings = flat(resume_settings(task, cfg))  # kept in the checkpoint, so a refused resume can name each change
    if accelerate.world_size() > 1:
        parts["processes"] = accelerate.world_size()
    fingerprint = config_hash(parts)
    metric = task.primary_metric
    history: list[dict] = []
    best = {"epoch": -1, "value": -math.inf, "state": None, "metrics": {}}
    start_epoch, elapsed = 1, 0.0
    timings: dict[str, list[float]] = {"train": [], "val": []}
    planned = cfg.epochs  # fewer once a time limit shows that only so many fit (fit_epochs_to_time_limit)

    if checkpoint_path is not None:
        checkpointing.wait_for(checkpoint_path)  # an interrupted run's background write, in this process
    if checkpoint_path is not None and cfg.resume and checkpoint_path.exists():
        ck = read_resume_checkpoint(checkpoint_path)
        differs = [k for k in parts if (ck.get("fingerprint_parts") or {}).get(k) != parts[k]]
        if ck.get("fingerprint") == fingerprint and not differs:
            planned = int(ck.get("planned", cfg.epochs))
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            if ema is not None:
                ema.load_state_dict(ck["ema"])
            set_rng_states(ck["rng"])
            if "rank_rngs" in ck:  # torchrun: each rank resumes its own torch stream
                torch.set_rng_state(accelerate.own_rng_state(ck))
            train_loader.generator.set_state(ck["loader_rng"])
            history, best, elapsed, timings = ck["history"], ck["best"], ck["elapsed"], ck["timings"]
            start_epoch = planned + 1 if ck.get("done") else ck["epoch"] + 1  # done: early stop or time limit included
            print(f"[{desc}] resuming from {checkpoint_path} after epoch {ck['epoch']}"
                  + (" (training had finished)" if ck.get("done") else ""))
            if isinstance(scheduler, budget.FittedSchedule) and not ck.get("done"):
                planned = refit_on_resume(scheduler, cfg, planned, elapsed, len(train_loader), desc)
        else:
            why = resume_mismatch(ck, differs, settings)
            if cfg.resume == "strict":
                raise CheckpointError(
                    f"{checkpoint_path} belongs to another run: {why} (rule: train.resume: strict "
                    f"resumes only the same settings, seed, code and data). Delete the file to start afresh, or set "
                    f"train.resume: true to start afresh automatically.")
            print(f"[{desc}] not resuming from {checkpoint_path}: {why}; starting afresh")

    t0 = time.perf_counter() - elapsed
    stop = cfg.early_stopping
    time_limit = time_budget(cfg, timings)
    writer = (checkpointing.BackgroundWriter(write_checkpoint)
              if checkpointing.in_background(cfg.checkpoint_background, device) else None)

    def save_checkpoint(epoch: int, done: bool = False, rank_rngs: list | None = None) -> None:
        # tensors and plain containers only, so resuming needs no pickled code (weights_only=True)
        save_last(checkpoint_path, {
            "fingerprint": fingerprint, "fingerprint_parts": parts, "settings": settings, "epoch": epoch, "done": done,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "rng": get_rng_states(),
            "loader_rng": train_loader.generator.get_state(), "history": history, "best": best,
            "elapsed": time.perf_counter() - t0, "timings": timings, "planned": planned,
            **({"rank_rngs": rank_rngs} if rank_rngs is not None and len(rank_rngs) > 1 else {})}, writer)

    epoch = start_epoch
    while epoch <= planned:
        train_model.train()
        before_epoch(model, epoch)  # freeze_encoder_epochs: the pretrained encoder frozen, then trained
        if sampler is not None:
            sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        loss_sum, n_batches = 0.0, 0
        epoch_start = time.perf_counter()
        bar = tqdm(train_loader, desc=f"[{desc}] epoch {epoch}/{planned}", leave=False, mininterval=1.0, dynamic_ncols=True,
                   disable=None)  # shown on a terminal, silent in logs
        for images, targets in bar:
            images, targets = to_device(images, device), to_device(targets, device)
            if mixer is not None:
                images, targets = mixer(images, targets)
            with acc.autocast():
                loss = task.training_loss(train_model, acc.images(images), targets)
            loss = loss.float()  # the loss and its scaling in fp32 under mixed precision
            optimizer.zero_grad(set_to_none=True)
            acc.backward_step(loss, optimizer, model.parameters(), cfg.grad_clip_norm)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"[{desc}] loss became {value} at epoch {epoch}; lower optimizer.lr")
            loss_sum += value
            n_batches += 1
            if not bar.disable:
                bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}", refresh=False)
        timings["train"].append(time.perf_counter() - epoch_start)
        row = {"epoch": epoch, "train_loss": accelerate.mean_across_ranks(loss_sum / max(n_batches, 1)),
               "lr": optimizer.param_groups[0]["lr"]}
        # validated: every val_every-th epoch, the last, and the one the time limit stops at (rank 0's clock decides)
        due = epoch % cfg.val_every == 0 or epoch == planned
        out = time_limit is not None and epoch < planned and accelerate.broadcast(time_limit.out_of_time(
            time.perf_counter() - t0, epoch, timings, due))
        val = None
        if due or out:
            val_start = time.perf_counter()
            # scored on rank 0 and broadcast (every rank holds the same weights), under the training autocast
            with acc.autocast():
                val = accelerate.broadcast(task.evaluate(scored, val_loader, device).metrics if accelerate.is_main() else None)
            if train_eval_loader is not None:
                with acc.autocast():
                    plain = accelerate.broadcast(task.evaluate(scored, train_eval_loader, device).metrics
                                                 if accelerate.is_main() else None)
                row[f"train_{metric}"] = plain[metric]
                if "loss" in plain:
                    row["train_loss_plain"] = plain["loss"]
            row.update({f"val_{k}": v for k, v in val.items()})
            timings["val"].append(time.perf_counter() - val_start)
        row = plain_numbers(row)  # plain floats: the checkpoint stays loadable with weights_only=True
        history.append(row)
        print(f"[{desc}] epoch {epoch}/{planned} train_loss={row['train_loss']:.4f}"
              + (f" val_{metric}={val[metric]:.4f}" + (f" val_loss={val['loss']:.4f}" if "loss" in val else "")
                 if val is not None else f" (validated every {cfg.val_every} epochs)"), flush=True)
        # the first validated epoch is best so far even when its metric is NaN (a split without ground truth)
        if val is not None and (best["state"] is None or val[metric] > best["value"] + (stop.min_delta if best["epoch"] > 0 else 0)):
            best = {"epoch": epoch, "value": float(val[metric]), "state": copy.deepcopy(scored.state_dict()),
                    "metrics": plain_numbers(val)}
        # re-fitted after every epoch, before the checkpoint (which keeps the plan and the schedule's span)
        if isinstance(scheduler, budget.FittedSchedule) and not out and epoch < planned:
            planned = follow_plan(time_limit, scheduler, planned, epoch, time.perf_counter() - t0, timings,
                                  len(train_loader), desc)
        rank_rngs = accelerate.gather(torch.get_rng_state())  # every rank's, so each resumes its own stream
        if (checkpoint_path is not None and accelerate.is_main()  # rank 0 alone writes
                and checkpointing.due(epoch, planned, cfg.checkpoint_every, out)):
            save_checkpoint(epoch, rank_rngs=rank_rngs)
        if log_metrics is not None:  # after the checkpoint, so an interruption here loses no epoch
            log_metrics({k: v for k, v in row.items() if k != "epoch"}, epoch)
        if out:
            say_out_of_time(time_limit, epoch, planned, time.perf_counter() - t0, timings, desc)
            break
        # patience counts epochs, checked on validated ones
        if stop.enabled and val is not None and epoch - best["epoch"] >= stop.patience:
            print(f"[{desc}] early stopping at epoch {epoch}: no better val_{metric} for {stop.patience} epochs "
                  f"(best {best['value']:.4f} at epoch {best['epoch']})")
            break
        epoch += 1

    if writer is not None:  # the last epoch's file is whole before it is marked done (written here, at once) or removed
        writer.wait()
        writer = None
    seconds = time.perf_counter() - t0
    scored.load_state_dict(best["state"])
    if accelerate.is_main():
        save_model(model_path, best["state"], task, extra={"epoch": best["epoch"], "val_metrics": best["metrics"]})
        if checkpoint_path is not None and keep_checkpoint and history:
            save_checkpoint(int(history[-1]["epoch"]), done=True)
        elif checkpoint_path is not None and checkpoint_path.exists():
            checkpoint_path.unlink()  # finished: nothing left to resume
    return FitResult(pd.DataFrame(history), best["epoch"], best["metrics"], seconds, timings, planned=planned,
                     final_lr=float(history[-1]["lr"]) if history else float("nan"),
                     end_lr=scheduler.end_lr if isinstance(scheduler, budget.FittedSchedule) else None,
                     time_limit_s=cfg.time_limit_minutes * 60)


def diagnose_overfitting(history: pd.DataFrame, metric: str, min_gap_growth: float = 0.02, min_flat_epochs: int = 2) -> str | None:
    """A sentence when the model overfits: the validation metric stopped improving while the gap
    between train and validation kept growing. Names the epoch where it started; None otherwise. ``min_flat_epochs``
    counts validated epochs."""
    train_col, val_col = f"train_{metric}", f"val_{metric}"
    if train_col not in history or val_col not in history:
        return None
    history = history.dropna(subset=[val_col]).reset_index(drop=True)  # validated epochs only (train.val_every)
    if len(history) < min_flat_epochs + 1:
        return None
    best_idx = int(history[val_col].values.argmax())
    if len(history) - 1 - best_idx < min_flat_epochs:
        return None
    gap = (history[train_col] - history[val_col]).values
    growth = gap[best_idx + 1:].max() - gap[best_idx]
    if growth < min_gap_growth:
        return None
    start = int(history["epoch"].iloc[best_idx + 1])
    return (f"overfitting from epoch {start}: val {metric} peaked at {history[val_col].iloc[best_idx]:.4f} in epoch "
            f"{int(history['epoch'].iloc[best_idx])} and did not improve afterwards, while the train-val gap grew from "
            f"{gap[best_idx]:.4f} to {gap[best_idx + 1:].max():.4f}")


NO_OVERFITTING = "no sign of overfitting (val metric still improving or gap not growing)"


def overfitting_verdict(history: pd.DataFrame, metric: str, min_flat_epochs: int = 2) -> str:
    """The evaluation report's line on overfitting: :func:`diagnose_overfitting`'s sentence, no sign of it, or that
    it cannot tell, and why (no train metric, too few validated epochs)."""
    if f"train_{metric}" not in history:
        return ("cannot tell: no train metric to compare with validation (train.track_train_metric: false; set it to "
                "true to score a training subset each epoch)")
    validated = int(history[f"val_{metric}"].notna().sum()) if f"val_{metric}" in history else 0
    if validated < min_flat_epochs + 1:
        return f"cannot tell: {validated} validated epoch(s), the diagnosis needs at least {min_flat_epochs + 1}"
    return diagnose_overfitting(history, metric, min_flat_epochs=min_flat_epochs) or NO_OVERFITTING


@torch.no_grad()
def measure_speed(model: nn.Module, loader: DataLoader, device: torch.device, latency_repeats: int = 10) -> dict[str, float]:
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
    torch.save({"model": state, "task": task.name, "class_names": task.class_names(),
                "config": task.cfg.model_dump(mode="json"), **(extra or {})}, buf)
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
        leftovers += order[quota[y]:]
    picked += rng.permutation(leftovers).tolist()[: n - len(picked)]  # rounding remainder, drawn at random
    return sorted(picked)


def overfit_one_batch(task: CVTask, model: nn.Module, batch, steps: int, lr: float, device: torch.device,
                      done: Callable[[list[float]], bool] | None = None) -> list[float]:
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
