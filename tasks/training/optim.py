"""The optimiser and the learning-rate schedule that ``tasks.training.engine.fit`` trains with (issue 30), built from the
typed settings (``train.optimizer``, ``train.scheduler``): no constant of theirs lives in the training loop."""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from tasks.config import OptimizerConfig, TrainConfig
from tasks.training import budget


def parameter_groups(
    model: nn.Module, cfg: OptimizerConfig, lr_factor: Callable[[str], float] | None = None
) -> list[dict]:
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
        groups += [
            {"params": [p for _, p in mine if p.ndim > 1], "weight_decay": cfg.weight_decay, **extra},
            {"params": [p for _, p in mine if p.ndim <= 1], "weight_decay": 0.0, **extra},
        ]
    return groups


OPTIMIZERS = {
    "sgd": lambda groups, c: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.momentum > 0),
    "adam": lambda groups, c: torch.optim.Adam(groups, lr=c.lr),
    "adamw": lambda groups, c: torch.optim.AdamW(groups, lr=c.lr),
}


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, lr_factor: Callable[[str], float] | None = None
) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](parameter_groups(model, cfg, lr_factor), cfg)


def build_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step schedule: warmup (``train.scheduler.warmup``) then step / cosine; one-cycle has its own warmup."""
    s, total = cfg.scheduler, cfg.epochs * steps_per_epoch
    warmup = min(s.warmup_epochs * steps_per_epoch, max(total - 1, 0))
    sched = torch.optim.lr_scheduler
    if s.name == "onecycle":
        if total < 4:  # too few steps for a ramp up and down (e.g. one epoch of one batch): constant lr
            return sched.LambdaLR(optimizer, lambda _: 1.0)
        pct = warmup / total if warmup else s.onecycle_pct_start
        # at least two steps in each phase, or OneCycleLR divides by zero
        max_lr = [cfg.optimizer.lr * g.get("lr_factor", 1.0) for g in optimizer.param_groups]
        return sched.OneCycleLR(
            optimizer, max_lr=max_lr, total_steps=total, pct_start=min(max(pct, 2.5 / total), 1 - 2.5 / total)
        )
    if s.name == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1))
    elif s.name == "step":
        main = sched.StepLR(optimizer, step_size=s.step_size * steps_per_epoch, gamma=s.gamma)
    else:
        main = sched.LambdaLR(optimizer, lambda _: 1.0)
    if not warmup:
        return main
    if s.warmup == "constant":
        ramp = sched.ConstantLR(optimizer, factor=s.constant_warmup_factor, total_iters=warmup)
    else:
        ramp = sched.LinearLR(optimizer, start_factor=s.warmup_start_factor, total_iters=warmup)
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def schedule_table(cfg: TrainConfig, steps_per_epoch: int) -> tuple[list[float], list[float | None]]:
    """The configured schedule's learning rate and momentum (one-cycle cycles it) at each of its steps: torch's
    scheduler (:func:`build_scheduler`) stepped on a throwaway optimizer of the same kind."""
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
