"""``train.time_limit_minutes``: how many steps fit, when to stop, and the learning-rate schedule run over them.

The plan aims at :data:`TARGET_SHARE` of the limit and is re-fitted after every epoch, so a forecast that moves (a
slow epoch, a machine that frees up) moves the plan, and the schedule is re-spanned over it: it reaches its final
learning rate on the last planned step. The plan counts steps (:func:`steps_to_plan`): whole epochs, and the last
one partial when a whole one would not fit, so up to an epoch of the limit is not left unused. Epoch times are the median of the recent ones (one slow epoch does not cut
the plan), without the first epoch of a process once there are others (it carries one-time costs: cache filling,
warm-up). The run stops early only when even one more step (one more epoch, without a fitted plan that can shrink to a partial
one) would end past 100% of the limit.

In the last :data:`GUARD_EPOCHS` planned epochs a guard watches the time per step (earlier, the re-plan after each
epoch still has time to correct, and one slow epoch does not cut the plan): when the forecast passes :data:`GUARD_SHARE` of the limit
(a slowdown whole-epoch planning cannot see until the epoch ends), the plan is cut to the steps that fit
(:func:`steps_that_fit`), perhaps mid-epoch, and the schedule re-spanned to end on the new last step.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

TARGET_SHARE = 0.97  # of the time limit the plan aims at: the rest absorbs epoch-to-epoch noise
RECENT_EPOCHS = 5  # epoch times are the median of these last ones
GUARD_SHARE = 0.99  # within an epoch, the plan is cut when its forecast passes this share (the rest: saving)
RECENT_STEPS = 20  # the guard's time per step is the median of this epoch's last ones
GUARD_EPOCHS = 2  # the guard watches the last planned epochs (before them, the re-plan after each epoch corrects)


def recent_median(seconds: list[float], start: int = 0) -> float:
    """The median of the last :data:`RECENT_EPOCHS` of ``seconds[start:]`` (this process's timings), leaving out the
    first of them when there are others; 0 when there are none."""
    mine = seconds[start:]
    if len(mine) > 1:
        mine = mine[1:]
    return statistics.median(mine[-RECENT_EPOCHS:]) if mine else 0.0


def validations(first: int, last: int, val_every: int) -> int:
    """Validation passes in epochs ``first``..``last``: every ``val_every``-th and the last (always validated)."""
    if last < first:
        return 0
    due = last // val_every - (first - 1) // val_every
    return due + (0 if last % val_every == 0 else 1)


def seconds_to_finish(done: int, last: int, train_s: float, val_s: float, val_every: int, pending_val: bool) -> float:
    """Seconds from now until epoch ``last`` is trained and validated, ``done`` epochs being trained (with
    ``pending_val``, epoch ``done``'s validation is still to come)."""
    return (last - done) * train_s + (validations(done + 1, last, val_every) + pending_val) * val_s


def epochs_that_fit(
    limit_s: float,
    spent: float,
    done: int,
    train_s: float,
    val_s: float,
    val_every: int,
    cap: int,
    pending_val: bool = False,
    share: float = TARGET_SHARE,
) -> int:
    """The most epochs, ``done`` trained and at most ``cap``, that end within ``share`` of ``limit_s`` (``spent`` so
    far; ``train_s`` and ``val_s`` seconds per training and validation pass); at least ``done``."""
    fits = done
    while (
        fits < cap
        and spent + seconds_to_finish(done, fits + 1, train_s, val_s, val_every, pending_val) <= share * limit_s
    ):
        fits += 1
    return fits


def steps_to_plan(
    limit_s: float,
    spent: float,
    done: int,
    steps_per_epoch: int,
    train_s: float,
    val_s: float,
    val_every: int,
    cap: int,
    share: float = TARGET_SHARE,
) -> int:
    """The most training steps in all, ``done`` epochs trained and validated where due and at most ``cap`` epochs,
    that end within ``share`` of ``limit_s``: the whole epochs of :func:`epochs_that_fit`, then the steps of the next
    epoch that fit beside them and its validation (the epoch training ends in is validated); at least ``done``'s."""
    whole = epochs_that_fit(limit_s, spent, done, train_s, val_s, val_every, cap, share=share)
    if whole >= cap or train_s <= 0:
        return whole * steps_per_epoch
    step_s = train_s / steps_per_epoch
    # the next epoch whole would pass the share: it runs as many of its steps as the room left holds
    room = share * limit_s - spent - seconds_to_finish(done, whole + 1, train_s, val_s, val_every, False) + train_s
    extra = min(max(math.floor(room / step_s + 1e-9), 0), steps_per_epoch - 1)
    return whole * steps_per_epoch + extra


def steps_that_fit(
    room_s: float, step: int, total: int, steps_per_epoch: int, epoch: int, step_s: float, val_s: float, val_every: int
) -> int:
    """The most training steps in all, ``step`` done (in epoch ``epoch``, not yet validated) and at most ``total``,
    that end within ``room_s`` seconds from now at ``step_s`` seconds a step, with the validation passes still due
    at ``val_s`` each (the epoch training ends in is validated); at least ``step``."""
    fits = total
    while fits > step:
        last_epoch = -(-fits // steps_per_epoch)
        if (fits - step) * step_s + validations(epoch, last_epoch, val_every) * val_s <= room_s:
            break
        fits -= 1
    return fits


@dataclass
class TimeBudget:
    """The time limit of one training run. ``first`` is the index of this process's first epoch in the timings
    (a resumed run: those before were measured by another process, perhaps under other load)."""

    limit_s: float
    cap: int  # train.epochs: never more
    val_every: int
    first: int = 0  # index of this process's first training pass in the timings
    first_val: int = 0  # and of its first validation pass

    def estimates(self, timings: dict[str, list[float]]) -> tuple[float, float]:
        """Seconds per training pass and per validation pass (medians of the recent ones of this process; the
        interrupted process's when this one has none yet)."""
        train, val = timings["train"], timings["val"]
        start = self.first if len(train) > self.first else 0
        val_start = self.first_val if len(val) > self.first_val else 0
        return recent_median(train, start), recent_median(val, val_start)

    def out_of_time(
        self, spent: float, done: int, timings: dict[str, list[float]], validating_now: bool, share_of_epoch: float = 1
    ) -> bool:
        """True when ``share_of_epoch`` of one more epoch (and its validation: the epoch training stops at is
        validated) would end past the limit, after this epoch's own validation when it is due."""
        train_s, val_s = self.estimates(timings)
        more = seconds_to_finish(done, done + 1, train_s, val_s, self.val_every, validating_now)
        return spent + more - (1 - share_of_epoch) * train_s > self.limit_s

    def plan(self, spent: float, done: int, timings: dict[str, list[float]], steps_per_epoch: int) -> int:
        """The steps to train in all, after ``done`` epochs (validated where due) took ``spent`` seconds: those that
        end within :data:`TARGET_SHARE` of the limit, the last epoch perhaps partial; else those within the limit,
        and at least one more (the caller has checked :meth:`out_of_time` for one step)."""
        train_s, val_s = self.estimates(timings)
        args = (self.limit_s, spent, done, steps_per_epoch, train_s, val_s, self.val_every, self.cap)
        fits = steps_to_plan(*args)
        if fits <= done * steps_per_epoch:  # not one step within the target: what the limit itself holds
            fits = steps_to_plan(*args, share=1.0)
        return min(max(fits, done * steps_per_epoch + 1), self.cap * steps_per_epoch)

    def describe(self, timings: dict[str, list[float]]) -> str:
        train_s, val_s = self.estimates(timings)
        return (
            f"{TARGET_SHARE:.0%} of train.time_limit_minutes={self.limit_s / 60:g} at {train_s:.1f} s of training "
            f"and {val_s:.1f} s per validation pass (medians of the last {RECENT_EPOCHS} epochs)"
        )


class FittedSchedule:
    """The configured learning-rate schedule (its rate and momentum at each of its ``len(lrs)`` steps, as torch's
    scheduler gives them) run over another number of steps. :meth:`respan` keeps the rate where it is and spreads
    what is left of the schedule over the steps now planned, so a one-cycle or cosine schedule stays continuous and
    still reaches its final rate on the last planned step. Until the first re-span it is the configured schedule,
    step for step. Every parameter group gets the same rate, times its ``lr_factor`` (a pretrained encoder's)."""

    def __init__(self, optimizer, lrs: list[float], momenta: list[float | None], total_steps: int):
        self.optimizer, self.lrs, self.momenta = optimizer, lrs, momenta
        self.step_count = 0
        # real step -> step of the configured schedule, linear between these two points
        self.anchor = [0.0, 0.0]
        self.end = [float(max(total_steps - 1, 0)), float(len(lrs) - 1)]
        self._apply()

    def position(self) -> float:
        """Where on the configured schedule the current step is."""
        (x0, y0), (x1, y1) = self.anchor, self.end
        if self.step_count >= x1 or x1 <= x0:
            return y1
        return y0 + (self.step_count - x0) * (y1 - y0) / (x1 - x0)

    def respan(self, total_steps: int) -> None:
        """The rest of the schedule spread over steps ``step_count``..``total_steps - 1``."""
        self.anchor = [float(self.step_count), self.position()]
        self.end = [float(max(total_steps - 1, self.step_count)), float(len(self.lrs) - 1)]
        self._apply()

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    @property
    def end_lr(self) -> float:
        return self.lrs[-1]

    def _apply(self) -> None:
        lr, momentum = self._at(self.lrs), self._at(self.momenta) if self.momenta[0] is not None else None
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_factor", 1.0)  # a pretrained encoder's groups at their fraction
            if momentum is not None and "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
            elif momentum is not None:
                group["momentum"] = momentum

    def _at(self, table: list) -> float:
        v = self.position()
        i = min(int(v), len(table) - 1)
        j = min(i + 1, len(table) - 1)
        return table[i] + (v - i) * (table[j] - table[i]) if v > i else table[i]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "anchor": list(self.anchor), "end": list(self.end)}

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.anchor, self.end = int(state["step_count"]), list(state["anchor"]), list(state["end"])
        self._apply()
