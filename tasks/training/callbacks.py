"""The training loop's callbacks (issue 30): ``tasks.training.engine.fit`` is a short loop, and each concern beside the
training step is a small object here: the exponential moving average of the weights, a pretrained encoder's
freeze-then-unfreeze, the resumable last checkpoint, the time limit and its schedule refit, the best weights,
early stopping and per-epoch logging.

Every callback sees the loop's shared state, a :class:`Run`. The hooks, in the order ``fit`` calls them (each
callback of the list in turn): ``on_fit_start`` (the model, optimiser and schedule are built; a resume restores
them here), ``on_train_start`` (the state is final, resumed or not; the first epoch comes next),
``on_epoch_start``, ``on_batch_end`` (after each optimiser and schedule step), ``on_train_end`` (the epoch's
training pass is done, its validation not yet: the time limit decides here whether this epoch is the last),
``on_epoch_end`` (validated and recorded; a callback ends training with ``run.stop``), ``on_fit_end`` (training
is over; the best weights are saved next) and ``on_saved`` (they are).
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cv_models.settings import diff_text
from tasks.config import TrainConfig
from tasks.training import accelerate, budget, checkpointing


@dataclass
class Run:
    """What the training loop and its callbacks share."""

    cfg: TrainConfig
    desc: str  # the name the log lines start with
    metric: str  # the task's primary metric (higher is better)
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch's scheduler or a budget.FittedSchedule
    train_loader: Any
    clock: Callable[[], float]  # time.perf_counter, as tasks.training.engine sees it
    scored: nn.Module | None = None  # the weights evaluated and saved: the model's, or their moving average
    ema: Any = None  # torch's AveragedModel (the EMA callback's)
    planned: int = 0  # the epochs planned: train.epochs, or those that fit the time limit
    epoch: int = 1
    t0: float = 0.0  # the clock when training started (before any resumed time)
    elapsed: float = 0.0  # seconds an interrupted run had spent before this process resumed it
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": -1, "value": -math.inf, "state": None, "metrics": {}})
    timings: dict[str, list[float]] = field(default_factory=lambda: {"train": [], "val": []})
    row: dict = field(default_factory=dict)  # this epoch's history row
    val: dict | None = None  # this epoch's validation metrics; None: not validated
    due: bool = False  # validation is due this epoch (train.val_every, or the last planned)
    out: bool = False  # the time limit ends training after this epoch
    cut: int = 0  # the time limit's guard: epoch ``planned`` ends after this many steps (0: all of them)
    stop: bool = False  # training ends after this epoch
    resumed: dict | None = None  # the checkpoint this run resumed from

    def spent(self) -> float:
        return self.clock() - self.t0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def planned_steps(self) -> int:
        """The plan in training steps: its last epoch ends after ``cut`` steps (0: all of them)."""
        return (self.planned - 1) * self.steps_per_epoch + (self.cut or self.steps_per_epoch)

    def plan_steps(self, steps: int) -> None:
        """The plan set to ``steps`` training steps in all: whole epochs, the last perhaps partial."""
        self.planned, self.cut = -(-steps // self.steps_per_epoch), steps % self.steps_per_epoch

    def describe_plan(self) -> str:
        """The plan in epochs (``9.5 of 60 epochs fit``) and, when its last epoch is partial, what it holds."""
        if not self.cut:
            return f"{self.planned} of {self.cfg.epochs} epochs fit"
        whole, per_epoch = self.planned - 1, self.steps_per_epoch
        return (
            f"{whole + self.cut / per_epoch:.1f} of {self.cfg.epochs} epochs fit "
            f"({whole} whole and {self.cut} of {per_epoch} steps of epoch {self.planned})"
        )

    def partial(self) -> bool:
        """This epoch was cut short by the time limit's guard (its row says after how many steps)."""
        return "steps" in self.row


class Callback:
    """A hook of every kind, doing nothing: subclasses override the ones they need."""

    def on_fit_start(self, run: Run) -> None: ...
    def on_train_start(self, run: Run) -> None: ...
    def on_epoch_start(self, run: Run) -> None: ...
    def on_batch_end(self, run: Run) -> None: ...
    def on_train_end(self, run: Run) -> None: ...
    def on_epoch_end(self, run: Run) -> None: ...
    def on_fit_end(self, run: Run) -> None: ...
    def on_saved(self, run: Run) -> None: ...


def call(callbacks: list[Callback], hook: str, run: Run) -> None:
    for cb in callbacks:
        getattr(cb, hook)(run)


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


class EMA(Callback):
    """``train.ema_decay``: the exponential moving average of the weights (buffers included) is what gets scored
    and saved."""

    def __init__(self, decay: float):
        self.decay = decay

    def on_fit_start(self, run: Run) -> None:
        avg = torch.optim.swa_utils.get_ema_multi_avg_fn(self.decay)
        run.ema = torch.optim.swa_utils.AveragedModel(run.model, multi_avg_fn=avg, use_buffers=True)
        run.scored = run.ema.module

    def on_batch_end(self, run: Run) -> None:
        run.ema.update_parameters(run.model)


class EncoderSchedule(Callback):
    """A CVTask's hook for a pretrained encoder (``freeze_encoder_epochs``: frozen, then trained); a duck-typed
    task without it trains everything alike."""

    def __init__(self, before_epoch: Callable[[nn.Module, int], None]):
        self.before_epoch = before_epoch

    def on_epoch_start(self, run: Run) -> None:
        self.before_epoch(run.model, run.epoch)


class BestWeights(Callback):
    """Keeps the weights with the best validation metric (by more than ``min_delta`` once there is a best)."""

    def __init__(self, min_delta: float):
        self.min_delta = min_delta

    def on_epoch_end(self, run: Run) -> None:
        val, best = run.val, run.best
        # the first validated epoch is best so far even when its metric is NaN (a split without ground truth)
        if val is not None and (
            best["state"] is None or val[run.metric] > best["value"] + (self.min_delta if best["epoch"] > 0 else 0)
        ):
            run.best = {
                "epoch": run.epoch,
                "value": float(val[run.metric]),
                "state": copy.deepcopy(run.scored.state_dict()),
                "metrics": plain_numbers(val),
            }


class EarlyStopping(Callback):
    """``train.early_stopping``: stop when the validation metric has not improved for ``patience`` epochs
    (counted in epochs, checked on validated ones)."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_epoch_end(self, run: Run) -> None:
        if not run.stop and run.val is not None and run.epoch - run.best["epoch"] >= self.patience:
            print(
                f"[{run.desc}] early stopping at epoch {run.epoch}: no better val_{run.metric} for {self.patience} "
                f"epochs (best {run.best['value']:.4f} at epoch {run.best['epoch']})"
            )
            run.stop = True


class MetricsLog(Callback):
    """Each epoch's row to ``log(metrics, epoch)`` (MLflow), after the checkpoint so an interruption in it loses no
    epoch: place it after :class:`Checkpoint`."""

    def __init__(self, log: Callable[[dict, int], None]):
        self.log = log

    def on_epoch_end(self, run: Run) -> None:
        self.log({k: v for k, v in run.row.items() if k != "epoch"}, run.epoch)


class TimeLimit(Callback):
    """``train.time_limit_minutes``: stop before an epoch that would pass the limit; with a
    :class:`budget.FittedSchedule` (``train.fit_epochs_to_time_limit``) the epochs planned and the schedule's
    span follow the epochs that fit, re-fitted after every epoch (before the checkpoint, which keeps both). Within
    an epoch a guard cuts the plan, perhaps mid-epoch, when the time per step says it would pass the limit."""

    def __init__(self):
        self.budget: budget.TimeBudget | None = None
        self.tick, self.cut_in = 0.0, 0  # the guard's clock, and the epoch it last cut the plan in
        self.steps: list[float] = []  # this epoch's step times

    def fitted(self, run: Run) -> bool:
        return isinstance(run.scheduler, budget.FittedSchedule)

    def on_train_start(self, run: Run) -> None:
        cfg = run.cfg
        if run.resumed is not None and not run.resumed.get("done") and self.fitted(run):
            # the plan the interrupted run fitted (perhaps under other load) is dropped: the schedule spans the cap
            # again until this process has timed an epoch, and the plan is then re-fitted from the time left
            run.scheduler.respan(cfg.epochs * run.steps_per_epoch)
            print(
                f"[{run.desc}] time limit: resuming with {max(cfg.time_limit_minutes * 60 - run.elapsed, 0):.0f} s "
                f"of train.time_limit_minutes={cfg.time_limit_minutes:g} left; the plan of {run.planned} epochs "
                f"fitted before the interruption is dropped and re-fitted from the time left after this process's "
                f"first epoch",
                flush=True,
            )
            run.planned = cfg.epochs
        # the timings already there were measured by an interrupted run
        self.budget = budget.TimeBudget(
            cfg.time_limit_minutes * 60, cfg.epochs, cfg.val_every, len(run.timings["train"]), len(run.timings["val"])
        )

    def on_epoch_start(self, run: Run) -> None:
        self.tick, self.steps = run.clock(), []

    def on_batch_end(self, run: Run) -> None:
        now = run.clock()
        self.steps.append(now - self.tick)
        self.tick = now
        if not self.fitted(run) or len(run.timings["train"]) <= self.budget.first:
            return  # no plan of this process's own yet: the first epoch of a process runs against the cap
        if run.planned - run.epoch >= budget.GUARD_EPOCHS:
            return  # the re-plan after this epoch can still correct the plan
        step, per_epoch = run.scheduler.step_count, run.steps_per_epoch
        total = run.planned_steps()  # the plan's last step
        step_s, val_s = statistics.median(self.steps[-budget.RECENT_STEPS :]), self.budget.estimates(run.timings)[1]
        room = budget.GUARD_SHARE * self.budget.limit_s - run.spent()
        fits = accelerate.broadcast(  # rank 0's count
            budget.steps_that_fit(room, step, total, per_epoch, run.epoch, step_s, val_s, self.budget.val_every)
        )
        if fits < total:
            self.cut(run, fits, step_s)

    def cut(self, run: Run, fits: int, step_s: float) -> None:
        """The plan cut to ``fits`` steps: the schedule ends on the last, training stops after it."""
        per_epoch, was = run.steps_per_epoch, run.planned
        run.plan_steps(fits)
        self.cut_in = run.epoch
        run.scheduler.respan(fits)
        where = (
            f"after step {fits - (run.planned - 1) * per_epoch} of {per_epoch} of epoch {run.planned} (a partial epoch)"
        )
        print(
            f"[{run.desc}] time limit: steps now take {step_s:.2f} s (median of this epoch's last "
            f"{min(len(self.steps), budget.RECENT_STEPS)}), so the plan of {was} epochs would pass "
            f"{budget.GUARD_SHARE:.0%} of train.time_limit_minutes={self.budget.limit_s / 60:g}; training stops "
            + (where if run.cut else f"after epoch {run.planned}")
            + f" (step {fits} in all) and the learning-rate schedule now ends there",
            flush=True,
        )

    def on_train_end(self, run: Run) -> None:
        # rank 0's clock decides; the epoch it stops at is validated. A fitted plan can shrink to one more step.
        share = 1 / run.steps_per_epoch if self.fitted(run) else 1.0
        run.out = run.epoch < run.planned and accelerate.broadcast(
            self.budget.out_of_time(run.spent(), run.epoch, run.timings, run.due, share)
        )

    def on_epoch_end(self, run: Run) -> None:
        if run.out:
            train_s, val_s = self.budget.estimates(run.timings)
            print(
                f"[{run.desc}] time limit: stopping after epoch {run.epoch} of {run.planned} ({run.spent():.0f} s "
                f"spent; another epoch ({train_s:.0f} s, plus {val_s:.0f} s of validation: medians of the last "
                f"{budget.RECENT_EPOCHS}) would pass train.time_limit_minutes={self.budget.limit_s / 60:g})",
                flush=True,
            )
            run.stop = True
        elif self.fitted(run) and run.epoch < run.planned:
            self.replan(run)

    def replan(self, run: Run) -> None:
        """The plan re-fitted in steps after an epoch (its last epoch perhaps partial), the schedule re-spanned."""
        fits = accelerate.broadcast(self.budget.plan(run.spent(), run.epoch, run.timings, run.steps_per_epoch))
        if self.cut_in == run.epoch:  # the guard cut this epoch: its forecast, from the slower steps, holds
            fits = min(fits, run.planned_steps())
        if fits != run.planned_steps():
            run.scheduler.respan(fits)
            run.plan_steps(fits)
            print(
                f"[{run.desc}] time limit: {run.describe_plan()}, at {self.budget.describe(run.timings)}; the "
                f"learning-rate schedule now spans {fits} steps (train.fit_epochs_to_time_limit)",
                flush=True,
            )


PART_NAMES = {
    "settings": "the task's settings",
    "seed": "the seed",
    "code": "the task's code or the training loop's (tasks/training/engine.py, callbacks.py, device.py, optim.py, budget.py)",
    "data": "the data version (validate stage's digest)",
    "stage": "the stage's own settings",
    "n_train": "the number of training samples",
}


def changed_settings(old: dict, new: dict) -> str:
    """Every setting that differs between two flat :func:`tasks.training.engine.resume_settings`, with its old and new value."""
    diff: dict[str, tuple] = {}
    for key in sorted(
        set(old) | set(new), key=lambda k: (not k.startswith("task."), k)
    ):  # the task's keys first, by name
        shown = key.removeprefix("task.")  # fit's own train settings keep their "train." prefix
        if old.get(key) != new.get(key) and shown not in diff:
            diff[shown] = (old.get(key), new.get(key))
    return diff_text(diff)


def resume_mismatch(ck: dict, differs: list[str], settings: dict) -> str:
    """Why a checkpoint does not continue this run: each differing part, the settings by key (old -> new)."""
    if not ck.get("fingerprint_parts"):
        return "it was written by an older version of the pipeline"
    named = [
        f"{PART_NAMES[k]} ({changed_settings(ck['settings'], settings)})"
        if k == "settings" and ck.get("settings")
        else f"{k} ({PART_NAMES[k]})"
        for k in differs
    ]
    return ", ".join(named) + (" differs" if len(differs) == 1 else " differ") + " from this run"


@dataclass
class Checkpoint(Callback):
    """The resumable ``last.pt`` (tensors and plain containers only: it loads with ``weights_only=True``): resumed
    from when ``fingerprint`` matches, written every ``train.checkpoint_every`` epochs (in the background with
    ``background``), and at the end removed, or kept marked done (``keep``) for the caller to remove."""

    path: Path | None
    fingerprint: str
    parts: dict
    settings: dict  # flat resume settings, so a refused resume can name each change
    keep: bool = False
    background: bool = False
    writer: checkpointing.BackgroundWriter | None = None

    def on_fit_start(self, run: Run) -> None:
        if self.path is None:
            return
        checkpointing.wait_for(self.path)  # an interrupted run's background write, in this process
        if run.cfg.resume and self.path.exists():
            ck = checkpointing.read_resume_checkpoint(self.path)
            differs = [k for k in self.parts if (ck.get("fingerprint_parts") or {}).get(k) != self.parts[k]]
            if ck.get("fingerprint") == self.fingerprint and not differs:
                self.restore(run, ck)
            else:
                self.refuse(run, ck, differs)
        self.writer = checkpointing.BackgroundWriter(checkpointing.write_checkpoint) if self.background else None

    def restore(self, run: Run, ck: dict) -> None:
        run.planned = int(ck.get("planned", run.cfg.epochs))
        run.model.load_state_dict(ck["model"])
        run.optimizer.load_state_dict(ck["optimizer"])
        run.scheduler.load_state_dict(ck["scheduler"])
        if run.ema is not None:
            run.ema.load_state_dict(ck["ema"])
        checkpointing.set_rng_states(ck["rng"])
        if "rank_rngs" in ck:  # torchrun: each rank resumes its own torch stream
            torch.set_rng_state(accelerate.own_rng_state(ck))
        run.train_loader.generator.set_state(ck["loader_rng"])
        run.history, run.best, run.elapsed, run.timings = ck["history"], ck["best"], ck["elapsed"], ck["timings"]
        run.epoch = run.planned + 1 if ck.get("done") else ck["epoch"] + 1  # done: early stop or time limit included
        run.resumed = ck
        print(
            f"[{run.desc}] resuming from {self.path} after epoch {ck['epoch']}"
            + (" (training had finished)" if ck.get("done") else "")
        )

    def refuse(self, run: Run, ck: dict, differs: list[str]) -> None:
        why = resume_mismatch(ck, differs, self.settings)
        if run.cfg.resume == "strict":
            raise checkpointing.CheckpointError(
                f"{self.path} belongs to another run: {why} (rule: train.resume: strict "
                f"resumes only the same settings, seed, code and data). Delete the file to start afresh, or set "
                f"train.resume: true to start afresh automatically."
            )
        print(f"[{run.desc}] not resuming from {self.path}: {why}; starting afresh")

    def save(self, run: Run, epoch: int, done: bool = False, rank_rngs: list | None = None) -> None:
        checkpointing.save_last(
            self.path,
            {
                "fingerprint": self.fingerprint,
                "fingerprint_parts": self.parts,
                "settings": self.settings,
                "epoch": epoch,
                "done": done,
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "ema": run.ema.state_dict() if run.ema is not None else None,
                "rng": checkpointing.get_rng_states(),
                "loader_rng": run.train_loader.generator.get_state(),
                "history": run.history,
                "best": run.best,
                "elapsed": run.spent(),
                "timings": run.timings,
                "planned": run.planned,
                **({"rank_rngs": rank_rngs} if rank_rngs is not None and len(rank_rngs) > 1 else {}),
            },
            self.writer,
        )

    def on_epoch_end(self, run: Run) -> None:
        rank_rngs = accelerate.gather(torch.get_rng_state())  # every rank's, so each resumes its own stream
        if (
            self.path is not None
            and accelerate.is_main()  # rank 0 alone writes
            and checkpointing.due(run.epoch, run.planned, run.cfg.checkpoint_every, run.out)
        ):  # an epoch the time limit cut short ends training: a resume finds the run finished
            self.save(run, run.epoch, done=run.partial(), rank_rngs=rank_rngs)

    def on_fit_end(self, run: Run) -> None:
        if self.writer is not None:  # the last epoch's file is whole before it is marked done or removed
            self.writer.wait()
            self.writer = None

    def on_saved(self, run: Run) -> None:
        if not accelerate.is_main() or self.path is None:
            return
        if self.keep and run.history:
            self.save(run, int(run.history[-1]["epoch"]), done=True)
        elif self.path.exists():
            self.path.unlink()  # finished: nothing left to resume
