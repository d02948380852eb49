"""Issue 29: the figures reported (COCO scoring at the maxDets used, the fitted plan), the time budget (plan, stop,
schedule re-spanned and annealed, resume) and the warnings that should fire."""

import contextlib
import io
import itertools

import numpy as np
import pytest
import torch

from tests.conftest import FitHooksStub

from cv_models.data import coco
from tasks.config import TrainConfig
from tasks.training import budget, engine


def _crowded(n_objects: int = 150, class_names=("cell", "debris")):
    """One 1000x1000 image holding ``n_objects`` 40x40 boxes of the first class (none of the second), and a
    detector's results: every box found, scores falling."""
    anns, results = [], []
    for k in range(n_objects):
        x, y = 60 * (k % 15), 60 * (k // 15)
        anns.append({"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [x, y, 40, 40], "area": 1600, "iscrowd": 0})
        results.append({"image_id": 1, "category_id": 1, "bbox": [x + 1, y, 40, 40], "score": 1 - k / 1000})
    gt = {
        "images": [{"id": 1, "file_name": "a.png", "width": 1000, "height": 1000}],
        "annotations": anns,
        "categories": [{"id": k + 1, "name": c} for k, c in enumerate(class_names)],
    }
    return gt, results


def test_coco_aps_are_taken_at_the_raised_max_dets():
    gt, results = _crowded(150)
    metrics, per_class = coco.coco_map(gt, results, ["cell", "debris"])
    # every object found: AP 1 at maxDets 150 (pycocotools' summarize() gave -1 for mAP@[.5:.95], reported as 0)
    assert metrics["max_dets"] == 150
    assert metrics["map"] == pytest.approx(1.0) and metrics["map50"] == pytest.approx(1.0)
    assert metrics["map75"] == pytest.approx(1.0)
    # at COCO's 100, a third of the objects cannot be found: recall 100/150, AP@.5 = 67 of the 101 recall points
    assert metrics["map50_maxdets100"] == pytest.approx(67 / 101)
    assert metrics["mar100"] == pytest.approx(100 / 150)
    # a class without ground truth has no AP: NaN in the table, absent from the metrics, named in a note
    assert np.isnan(per_class.set_index("class").loc["debris", "ap50"]) and "ap50/debris" not in metrics
    assert metrics["ap50/cell"] == pytest.approx(1.0)
    assert "debris" in coco.no_ground_truth_notes(per_class)[0]
    # no ground truth at all: no AP (NaN), not 0; ground truth but nothing detected: AP 0
    assert np.isnan(coco.coco_map({**gt, "annotations": []}, results, ["cell", "debris"])[0]["map50"])
    assert coco.coco_map(gt, [], ["cell", "debris"])[0]["map50"] == 0.0


def test_coco_scoring_at_100_objects_is_pycocotools_summarize():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, results = _crowded(60)
    results = [{**r, "bbox": [r["bbox"][0] + (k % 7), *r["bbox"][1:]]} for k, r in enumerate(results)]  # imperfect
    metrics, _ = coco.coco_map(gt, results, ["cell", "debris"])
    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = gt
        g.createIndex()
        ev = COCOeval(g, g.loadRes(results), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert metrics["max_dets"] == 100
    assert [metrics[k] for k in ("map", "map50", "map75", "mar100")] == [ev.stats[i] for i in (0, 1, 2, 8)]
    assert metrics["map50_maxdets100"] == metrics["map50"]


def test_the_recompute_lines_give_the_reported_values():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, results = _crowded(150)
    metrics, _ = coco.coco_map(gt, results, ["cell", "debris"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        g = COCO()
        g.dataset = gt
        g.createIndex()
        e = COCOeval(g, g.loadRes(results), "bbox")
        e.params.maxDets = [1, 10, 100, 150]
        e.evaluate(), e.accumulate()
        exec(coco.RESCORE_LINES, {"e": e, "np": np, "prefix": ""})  # noqa: S102 (the lines RECOMPUTE.md gives users)
    values = {k: float(v) for k, v in (line.split() for line in out.getvalue().splitlines()[-4:])}
    assert values == pytest.approx({k: metrics[k] for k in ("map", "map50", "map75", "map50_maxdets100")})


# ---------------------------------------------------------------- the time budget


def test_a_plan_counts_the_validations_and_aims_at_97_percent():
    # 100 s spent, 8 s training + 2 s validation an epoch, 600 s: 97% leaves 482 s = 48 epochs, at most the cap
    assert budget.epochs_that_fit(600, 100, 1, 8, 2, val_every=1, cap=100) == 1 + 48
    assert budget.epochs_that_fit(600, 100, 1, 8, 2, val_every=1, cap=20) == 20
    # validated every 4th epoch (and the last): 482 s hold 56 more epochs (448 s of training, 15 validations = 30 s)
    assert budget.epochs_that_fit(600, 100, 1, 8, 2, val_every=4, cap=100) == 57
    assert budget.validations(2, 58, 4) == 15 and budget.validations(2, 56, 4) == 14
    assert budget.epochs_that_fit(600, 700, 1, 8, 2, val_every=1, cap=100) == 1  # already over


def test_the_guard_keeps_the_steps_that_fit_with_the_validations_still_due():
    # 29 of 36 planned steps done (4 a step of epoch 8), 2.5 s a step, 1 s a validation: 4.9 s of room hold one more
    # step and epoch 8's validation (3.5 s); two more need 6 s
    assert budget.steps_that_fit(4.9, 29, 36, 4, 8, 2.5, 1.0, val_every=1) == 30
    # every epoch's validation counts: reaching step 33 (epoch 9) needs epochs 8 and 9 validated
    assert budget.steps_that_fit(11.9, 29, 36, 4, 8, 2.5, 1.0, val_every=1) == 32
    assert budget.steps_that_fit(100, 29, 36, 4, 8, 2.5, 1.0, val_every=1) == 36  # the plan fits: kept
    assert budget.steps_that_fit(0.5, 29, 36, 4, 8, 2.5, 1.0, val_every=1) == 29  # no room: stop now


def test_one_slow_epoch_moves_the_estimate_little():
    # the median of the recent epochs, the process's first left out (cache filling, warm-up)
    assert budget.recent_median([30, 5, 5, 23, 5, 6]) == 5
    assert budget.recent_median([30]) == 30 and budget.recent_median([]) == 0
    # a resumed process plans with its own epochs once it has one
    assert budget.recent_median([60, 60, 5], start=2) == 5
    t = budget.TimeBudget(limit_s=100, cap=50, val_every=1)
    timings = {"train": [9, 5, 5, 23], "val": [1, 1, 1, 1]}
    assert not t.out_of_time(87, 4, timings, validating_now=True)  # 87 + 1 + 5 + 1 = 94: one more fits
    assert t.out_of_time(95, 4, timings, validating_now=True)  # 95 + 7 > 100
    # 10 steps an epoch of 0.5 s: 5 whole epochs end at 93 s, then 6 steps and a validation (4 s) reach 97 s
    assert t.plan(87, 4, timings, steps_per_epoch=10) == 5 * 10 + 6
    # no whole epoch fits in the limit any more, but a fitted plan can shrink to a partial one: 2 steps reach 97 s
    assert not t.out_of_time(95, 4, timings, validating_now=True, share_of_epoch=0.1)
    assert t.plan(95, 4, timings, steps_per_epoch=10) == 4 * 10 + 2
    # not one step within 97%: what the limit holds (2 steps), and at least one more step
    assert t.plan(98, 4, timings, steps_per_epoch=10) == 4 * 10 + 2
    assert t.plan(99.5, 4, timings, steps_per_epoch=10) == 4 * 10 + 1


def test_a_plan_of_3_and_a_half_epochs_keeps_the_half():
    # 97% of 600 s is 582 s; 1 epoch done in 100 s, 20 s epochs of 10 steps, 2 s validation: 21 more whole epochs end
    # at 562 s, then 20 s hold 9 steps (18 s) and the partial epoch's validation; whole epochs alone ended at 94%
    assert budget.steps_to_plan(600, 100, 1, 10, 20, 2, val_every=1, cap=100) == 22 * 10 + 9
    assert budget.steps_to_plan(600, 100, 1, 10, 20, 2, val_every=1, cap=22) == 22 * 10  # the cap holds
    # 3.5 epochs of room: 3 whole and half of the 4th
    assert budget.steps_to_plan(100, 0, 0, 4, 20, 0, val_every=1, cap=10, share=0.7) == 3 * 4 + 2


def test_a_fitted_schedule_is_the_configured_one_until_re_spanned_then_continuous_to_its_end():
    cfg = TrainConfig(epochs=10, optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9}, scheduler={"name": "onecycle"})
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01, momentum=0.9, nesterov=True)
    ref = engine.build_scheduler(ref_opt, cfg, 5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01, momentum=0.9, nesterov=True)
    sched = engine.make_scheduler(opt, cfg.model_copy(update={"time_limit_minutes": 1.0}), 5)
    for _ in range(7):  # step for step torch's one-cycle: rates and momentum
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
        assert opt.param_groups[0]["momentum"] == ref_opt.param_groups[0]["momentum"]
        ref_opt.step(), ref.step(), opt.step(), sched.step()
    before = opt.param_groups[0]["lr"]
    sched.respan(3 * 5)  # 3 epochs of 5 steps planned now (7 steps done)
    assert opt.param_groups[0]["lr"] == before  # no jump (rebuilding a 3-epoch one-cycle jumped to its peak)
    lrs = [before]
    for _ in range(7):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    # the last planned step (the 15th, index 14) runs at the schedule's final rate, and it stays there
    assert lrs[-1] == sched.end_lr == pytest.approx(0.01 / 25 / 1e4)
    sched.respan(30)  # more epochs fit after all: continuous again, and the end is reached at step 30
    steady = opt.param_groups[0]["lr"]
    sched.respan(40)
    assert opt.param_groups[0]["lr"] == steady
    state = sched.state_dict()
    again = engine.make_scheduler(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01, momentum=0.9),
        cfg.model_copy(update={"time_limit_minutes": 1.0}),
        5,
    )
    again.load_state_dict(state)  # a resumed run continues where the checkpoint was
    assert again.optimizer.param_groups[0]["lr"] == steady


class _Clock:
    """Seconds that pass only when the toy task says so: synthetic epoch timings through the real engine.fit."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


class _TimedTask(FitHooksStub):
    """Enough of a CVTask for engine.fit: a linear model; each training step and each validation pass advance the
    clock by the epoch's synthetic time. ``stop_at_step``: the run is killed there (KeyboardInterrupt)."""

    name, primary_metric = "toy", "score"

    def __init__(self, clock, epoch_seconds, val_seconds=1.0, steps_per_epoch=2, stop_at_step=None):
        self.cfg, self.clock, self.epoch_seconds, self.val_seconds = TrainConfig(), clock, epoch_seconds, val_seconds
        self.steps_per_epoch, self.steps, self.stop_at_step = steps_per_epoch, 0, stop_at_step

    def collate(self, batch):
        return torch.utils.data.default_collate(batch)

    def training_loss(self, model, x, y):
        if self.steps == self.stop_at_step:
            raise KeyboardInterrupt
        epoch = self.steps // self.steps_per_epoch
        self.clock.now += self.epoch_seconds(epoch + 1) / self.steps_per_epoch
        self.steps += 1
        return ((model(x).squeeze(1) - y) ** 2).mean()

    def evaluate(self, model, loader, device):
        from cv_models.base import EvalResult

        self.clock.now += self.val_seconds
        return EvalResult({"score": 0.5})

    def class_names(self):
        return []


def _timed_fit(tmp_path, monkeypatch, task, minutes=3.0, cap=60, checkpoint=None, log=None):
    monkeypatch.setattr(engine, "time", task.clock)
    torch.manual_seed(0)
    n = 4 * task.steps_per_epoch
    data = torch.utils.data.TensorDataset(torch.randn(n, 3), torch.randn(n))
    cfg = TrainConfig(
        epochs=cap,
        batch_size=4,
        track_train_metric=False,
        time_limit_minutes=minutes,
        optimizer={"name": "adamw", "lr": 3e-3},
        scheduler={"name": "onecycle"},
    )
    model = torch.nn.Linear(3, 1)
    return engine.fit(task, model, data, data, cfg, 0, tmp_path / "m.pt", checkpoint_path=checkpoint, log_metrics=log)


def test_a_slow_outlier_epoch_neither_cuts_the_schedule_nor_leaves_the_budget_unused(tmp_path, monkeypatch, capsys):
    # 5 s epochs, one of 23 s (the classifier), 1 s validation, 3 minutes: ~29 epochs
    clock = _Clock()
    task = _TimedTask(clock, lambda e: 23.0 if e == 12 else 9.0 if e == 1 else 5.0)
    result = _timed_fit(tmp_path, monkeypatch, task)
    out = capsys.readouterr().out
    assert "stopping after epoch" not in out and "the learning-rate schedule now spans" in out
    assert len(result.history) == result.planned  # every planned epoch trained
    assert 0.95 <= result.seconds / 180 <= 1.0
    lrs = result.history["lr"].tolist()
    assert lrs[-1] == result.end_lr == pytest.approx(3e-3 / 25 / 1e4)  # annealed to the end
    assert max(lrs) == pytest.approx(3e-3, rel=0.05)  # and through its peak
    # continuous: no epoch-to-epoch jump bigger than the schedule's own steepest at this length
    assert max(abs(a - b) for a, b in itertools.pairwise(lrs)) < 3e-3 * 0.25


def test_a_resumed_run_re_fits_the_plan_fitted_under_load(tmp_path, monkeypatch, capsys):
    clock = _Clock()
    # under load: 60 s epochs, so 2 of 60 epochs fit in 3 minutes; killed during epoch 2
    loaded = _TimedTask(clock, lambda e: 60.0, stop_at_step=3)
    with pytest.raises(KeyboardInterrupt):
        _timed_fit(tmp_path, monkeypatch, loaded, checkpoint=tmp_path / "last.pt")
    assert "2.5 of 60 epochs fit (2 whole and 1 of 2 steps of epoch 3)" in capsys.readouterr().out
    # resumed on a free machine: 4 s epochs
    free = _TimedTask(clock, lambda e: 4.0)
    result = _timed_fit(tmp_path, monkeypatch, free, checkpoint=tmp_path / "last.pt")
    out = capsys.readouterr().out
    assert "the plan of 3 epochs fitted before the interruption is dropped and re-fitted from the time left" in out
    assert len(result.history) == result.planned > 10
    assert 0.95 <= result.seconds / 180 <= 1.0
    assert result.history["lr"].iloc[-1] == result.end_lr


@pytest.mark.parametrize("minutes, slow_from", [(1.1, 6), (1.0, 8)])
def test_epochs_twice_as_slow_late_in_the_plan_end_annealed_within_the_limit(
    tmp_path, monkeypatch, capsys, minutes, slow_from
):
    # 5 s epochs of 4 steps, 1 s validation: 10 (9) epochs planned; from epoch 6 (8) on they take 10 s. Planning in
    # whole epochs alone stopped at epoch 8 of 9 with the lr at 1.9e-4 (1.1 min), or ended at 64 s of 60 (1.0 min)
    clock = _Clock()
    task = _TimedTask(clock, lambda e: 10.0 if e >= slow_from else 5.0, steps_per_epoch=4)
    result = _timed_fit(tmp_path, monkeypatch, task, minutes=minutes)
    out = capsys.readouterr().out
    assert "steps now take 2.50 s" in out and "stopping after epoch" not in out
    assert 0.95 * minutes * 60 <= result.seconds <= minutes * 60  # strictly within, the final validation included
    assert result.history["lr"].iloc[-1] == result.end_lr == pytest.approx(3e-3 / 25 / 1e4)
    assert len(result.history) == result.planned and not np.isnan(result.history["val_score"].iloc[-1])
    steps = result.history.iloc[-1].get("steps", 4)  # the last epoch partial (validated, its steps recorded) or whole
    assert task.steps == (result.planned - 1) * 4 + steps
    if steps < 4:
        assert f"stops after step {int(steps)} of 4 of epoch {result.planned} (a partial epoch)" in out
        assert f"(partial: {int(steps)} of 4 steps)" in out


def test_constant_epoch_times_never_wake_the_guard_and_a_partial_last_epoch_fills_the_budget(
    tmp_path, monkeypatch, capsys
):
    # 5 s epochs of 4 steps and 1 s validation, 60 s: 9 whole epochs end at 54 s (90%, what whole-epoch plans gave),
    # then 2 steps of a 10th and its validation reach 57.5 s (97% is 58.2 s), planned from epoch 1 on
    clock = _Clock()
    task = _TimedTask(clock, lambda e: 5.0, steps_per_epoch=4)
    result = _timed_fit(tmp_path, monkeypatch, task, minutes=1.0)
    out = capsys.readouterr().out
    assert "steps now take" not in out and "9.5 of 60 epochs fit (9 whole and 2 of 4 steps of epoch 10)" in out
    assert (result.planned, len(result.history), result.seconds, task.steps) == (10, 10, 57.5, 9 * 4 + 2)
    assert result.history["steps"].iloc[-1] == 2 and result.history["steps"].iloc[:-1].isna().all()
    assert "(partial: 2 of 4 steps)" in out and not np.isnan(result.history["val_score"].iloc[-1])  # validated
    assert result.history["lr"].iloc[-1] == result.end_lr == pytest.approx(3e-3 / 25 / 1e4)


def test_a_budget_of_3_and_a_half_epochs_trains_3_and_a_half_annealed_and_resumes_finished(
    tmp_path, monkeypatch, capsys
):
    # 10 s epochs of 4 steps, 1 s validation, 40.8 s: 97% (39.6 s) holds 3 epochs (33 s), 2 steps of a 4th (5 s) and
    # its validation; whole epochs alone used 33 s (81%)
    clock = _Clock()
    task = _TimedTask(clock, lambda e: 10.0, steps_per_epoch=4)

    def killed_after_the_last_checkpoint(metrics, epoch):
        if epoch == 4:  # the partial epoch's checkpoint is written; the kill comes before the model is saved
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _timed_fit(
            tmp_path, monkeypatch, task, 0.68, checkpoint=tmp_path / "last.pt", log=killed_after_the_last_checkpoint
        )
    assert "3.5 of 60 epochs fit (3 whole and 2 of 4 steps of epoch 4)" in capsys.readouterr().out
    assert task.steps == 3 * 4 + 2 and clock.now - 1000 == 39.0 and 39.0 / 40.8 >= 0.95
    again = _TimedTask(clock, lambda e: 10.0, steps_per_epoch=4)
    result = _timed_fit(tmp_path, monkeypatch, again, 0.68, checkpoint=tmp_path / "last.pt")
    assert "(training had finished)" in capsys.readouterr().out and again.steps == 0  # nothing trained again
    assert (result.planned, len(result.history), result.history["steps"].iloc[-1]) == (4, 4, 2)
    assert 0.95 * 40.8 <= result.seconds <= 40.8
    assert result.history["lr"].iloc[-1] == result.end_lr == pytest.approx(3e-3 / 25 / 1e4)


def test_a_run_the_guard_ended_mid_epoch_stays_finished_on_resume(tmp_path, monkeypatch, capsys):
    clock = _Clock()
    slow = _TimedTask(clock, lambda e: 10.0 if e >= 6 else 5.0, steps_per_epoch=4)

    def killed_after_the_last_checkpoint(metrics, epoch):
        if epoch == 8:  # the partial epoch's checkpoint is written; the kill comes before the model is saved
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _timed_fit(
            tmp_path, monkeypatch, slow, 1.0, checkpoint=tmp_path / "last.pt", log=killed_after_the_last_checkpoint
        )
    assert "(a partial epoch)" in capsys.readouterr().out
    again = _TimedTask(clock, lambda e: 5.0, steps_per_epoch=4)
    result = _timed_fit(tmp_path, monkeypatch, again, 1.0, checkpoint=tmp_path / "last.pt")
    assert "(training had finished)" in capsys.readouterr().out
    assert again.steps == 0 and len(result.history) == result.planned == 8  # nothing trained again
    assert result.history["lr"].iloc[-1] == result.end_lr


def test_a_real_training_with_a_time_limit_ends_annealed_within_it(project, capsys):
    from pathlib import Path
    from types import SimpleNamespace

    from cv_models import get_task
    from cv_models.normalize import load_normalizer
    from tasks import normstats
    from tasks.config import load_params
    from tasks.training.train import budget_figures, summary_metrics

    params = project.params(
        **{
            "tasks.classification.train.epochs": 200,
            "tasks.classification.train.time_limit_minutes": 0.12,
            "tasks.classification.train.scheduler": {"name": "cosine", "warmup_epochs": 1},
        }
    )
    normstats.run("classification", params)
    cfg = load_params(params).task("classification")
    task = get_task("classification", cfg)
    norm = load_normalizer("outputs/classification/normstats", cfg.normalization)
    train, val = task.dataset("train", task.eval_transforms(norm)), task.dataset("val", task.eval_transforms(norm))
    result = engine.fit(task, task.build_model(), train, val, cfg.train, 0, Path("m.pt"))
    out = capsys.readouterr().out
    assert "epochs fit" in out and "stopping after epoch" not in out
    assert 2 <= len(result.history) == result.planned < 200  # 2 under heavy load (seen with 4 jobs on 2 cores)
    assert result.history["lr"].iloc[-1] == result.end_lr  # the schedule's end reached
    assert result.end_lr < 1e-6 * cfg.train.optimizer.lr  # a cosine annealed to (almost) zero
    # 97% aimed at, in whole epochs; the strict 100% bound is checked with synthetic timings above, since one epoch's
    # noise on a shared machine can pass the 3% cushion of so short a limit
    limit, epoch_s = result.time_limit_s, max(result.timings["train"][1:]) + max(result.timings["val"][1:])
    assert 0.97 * limit - epoch_s <= result.seconds <= limit + 0.25 * epoch_s, (result.seconds, result.timings)
    # metrics.json states the plan as epochs (it said the cap, 200), the cap as epochs_cap, and where the lr ended
    summary = summary_metrics(SimpleNamespace(task=task, cfg=cfg), result)
    assert (summary["epochs"], summary["epochs_cap"], summary["final_lr"]) == (result.planned, 200, result.end_lr)
    assert budget_figures(result)["budget_use"] == pytest.approx(result.seconds / 7.2)


# ---------------------------------------------------------------- warnings that should fire
def test_classes_present_but_never_predicted_are_named():
    from cv_models.base import never_predicted

    names = ["road", "pole", "tree", "sky"]
    metrics = {"miou": 0.4, "predicted_classes": 2, **never_predicted(names, [50, 3, 9, 40], [60, 0, 0, 32])}
    lines = engine.silent_failure_warnings(metrics, {"miou": 0.2}, "miou", 4, "segmentation (validation)")
    assert len(lines) == 1 and "2 of 4 classes present in the data are never predicted: pole, tree" in lines[0]
    # a class absent from the data is not missed
    assert never_predicted(names, [50, 0, 9, 40], [60, 0, 9, 32]) == {}


def test_a_segmenter_predicting_5_of_11_classes_is_warned_about(project):
    """The issue's street-scene segmenter: the validation metrics themselves carry the missed classes."""
    from cv_models import get_task
    from tasks.config import load_params

    task = get_task("segmentation", load_params(project.params()).task("segmentation"))
    n = len(task.class_names())
    cm = torch.zeros(n, n, dtype=torch.long)
    cm[0, 0], cm[1, 1] = 500, 40  # background and the first shape predicted; the others predicted as background
    for k in range(2, n):
        cm[k, 0] = 30
    metrics = task._score(cm).metrics
    lines = engine.silent_failure_warnings(metrics, {"miou": 0.0}, "miou", n, "val")
    missed = task.class_names()[2:]
    assert any(
        f"{n - 2} of {n} classes present in the data are never predicted: {', '.join(missed)}" in ln for ln in lines
    )


def test_the_overfitting_line_says_when_it_cannot_tell():
    import pandas as pd

    no_train = pd.DataFrame({"epoch": [1, 2, 3, 4], "val_score": [0.5, 0.6, 0.6, 0.6]})
    assert engine.overfitting_verdict(no_train, "score").startswith("cannot tell: no train metric")
    assert "train.track_train_metric: false" in engine.overfitting_verdict(no_train, "score")
    short = no_train.assign(train_score=0.9).head(2)
    assert engine.overfitting_verdict(short, "score").startswith("cannot tell: 2 validated epoch(s)")
    healthy = no_train.assign(train_score=[0.5, 0.6, 0.6, 0.6])
    assert engine.overfitting_verdict(healthy, "score") == engine.NO_OVERFITTING
