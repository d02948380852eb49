"""The short training loop (issue 30): its callbacks' order, the schedule's constants as settings, and the fitted
schedule keeping a pretrained encoder's learning-rate factor."""

from __future__ import annotations

import torch

from tasks.config import TrainConfig
from tests.conftest import FitHooksStub
from tasks.training import budget, callbacks, engine, optim


def _first_lrs(cfg: TrainConfig, steps: int = 3) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
    sched = optim.build_scheduler(opt, cfg, 10)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_the_warmup_and_one_cycle_constants_are_settings():
    base = {"epochs": 4, "optimizer": {"name": "sgd", "lr": 0.1}}
    linear = TrainConfig(**base, scheduler={"name": "cosine", "warmup_epochs": 1, "warmup_start_factor": 0.5})
    assert _first_lrs(linear)[0] == 0.1 * 0.5
    constant = TrainConfig(
        **base, scheduler={"name": "cosine", "warmup": "constant", "warmup_epochs": 1, "constant_warmup_factor": 0.25}
    )
    assert _first_lrs(constant)[:2] == [0.1 * 0.25] * 2
    # one-cycle peaks at onecycle_pct_start of its 40 steps
    for pct in (0.3, 0.5):
        lrs, _ = optim.schedule_table(
            TrainConfig(**base, scheduler={"name": "onecycle", "onecycle_pct_start": pct}), 10
        )
        assert max(range(40), key=lrs.__getitem__) == round(pct * 40) - 1
    # the defaults are the constants the loop had
    s = TrainConfig().scheduler
    assert (s.warmup_start_factor, s.constant_warmup_factor, s.onecycle_pct_start) == (0.01, 0.1, 0.3)


def test_the_fitted_schedule_keeps_an_encoders_lr_factor():
    cfg = TrainConfig(
        epochs=2, time_limit_minutes=1, optimizer={"name": "adamw", "lr": 0.01}, scheduler={"name": "cosine"}
    )
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    opt = optim.build_optimizer(model, cfg.optimizer, lambda name: 0.5 if name.startswith("0.") else 1.0)
    sched = optim.make_scheduler(opt, cfg, 3)
    assert isinstance(sched, budget.FittedSchedule)
    for _ in range(2):
        sched.step()
        head, encoder = opt.param_groups[0]["lr"], opt.param_groups[-1]["lr"]
        assert encoder == head * 0.5 and head > 0


class _Task(FitHooksStub):
    name, primary_metric = "toy", "score"
    cfg = TrainConfig()


def test_the_callbacks_run_in_the_order_their_state_needs(tmp_path):
    cfg = TrainConfig(ema_decay=0.9, time_limit_minutes=1, early_stopping={"enabled": True})
    hooks = engine.default_callbacks(
        _Task(), cfg, 0, torch.device("cpu"), tmp_path / "last.pt", False, lambda metrics, epoch: None, {"seed": "0"}
    )
    kinds = [type(h) for h in hooks]
    assert kinds == [
        callbacks.EMA,
        callbacks.EncoderSchedule,
        callbacks.BestWeights,
        callbacks.TimeLimit,
        callbacks.Checkpoint,
        callbacks.MetricsLog,
        callbacks.EarlyStopping,
    ]
    # without EMA, time limit, logging or early stopping, only what every run needs
    plain = engine.default_callbacks(_Task(), TrainConfig(), 0, torch.device("cpu"), None, False, None, {})
    assert [type(h) for h in plain] == [callbacks.EncoderSchedule, callbacks.BestWeights, callbacks.Checkpoint]
