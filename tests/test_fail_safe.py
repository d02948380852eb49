"""Fail-safe pieces one at a time, in process and fast: resume only into the same run, checkpoints that
load with weights_only=True, the data version in MLflow, umask-mode outputs, the stage lock and the
clean-up of what killed stages leave behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cv_models import get_task
from tasks.config import load_params
from tasks.training import engine, runstate


def _fit(project, capsys, stop_at=None, data_version="v1", seed=0, keep=False, **overrides):
    cfg = load_params(
        project.params(
            **{"tasks.classification.train.epochs": 2, "tasks.classification.train.ema_decay": 0.5, **overrides}
        )
    ).task("classification")
    task = get_task("classification", cfg)
    data = task.dataset("train", task.eval_transforms(None))
    small = task.subset(data, list(range(48)))

    def log(metrics, epoch):
        if epoch == stop_at:
            raise KeyboardInterrupt

    capsys.readouterr()
    try:
        engine.fit(
            task,
            task.build_model(),
            small,
            small,
            cfg.train,
            seed,
            Path("m.pt"),
            Path("last.pt"),
            log_metrics=log,
            data_version=data_version,
            keep_checkpoint=keep,
        )
    except KeyboardInterrupt:
        pass
    return capsys.readouterr().out


def test_resume_checkpoint_holds_only_tensors_and_plain_containers(project, capsys):
    _fit(project, capsys, stop_at=1)
    ck = torch.load("last.pt", weights_only=True)  # EMA, optimiser, schedule, every RNG, history, best: all loadable
    assert ck["epoch"] == 1 and set(ck["rng"]) == {"torch", "python", "numpy"} and ck["ema"] is not None
    assert "resuming from last.pt after epoch 1" in _fit(project, capsys)


def test_a_finished_run_kept_for_its_stage_resumes_without_training(project, capsys):
    """A stage keeps its finished checkpoint (marked done): a kill after training, or a rerun, loses no epoch.
    Without keep_checkpoint (ablation arms, search trials) the finished run removes it."""
    _fit(project, capsys, keep=True)
    first = torch.load("m.pt", weights_only=True)["model"]
    assert torch.load("last.pt", weights_only=True)["done"]
    out = _fit(project, capsys)
    assert "resuming from last.pt after epoch 2 (training had finished)" in out and "epoch 1/2" not in out
    again = torch.load("m.pt", weights_only=True)["model"]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not Path("last.pt").exists()


@pytest.mark.parametrize(
    "change, part",
    [
        ({"tasks.classification.image_size": 40}, "the task's settings"),  # the 32 px -> 40 px resume
        ({"data_version": "v2"}, "the data version"),
        ({"seed": 7}, "the seed"),
    ],
)
def test_resume_only_into_the_same_run(project, capsys, change, part):
    _fit(project, capsys, stop_at=1)
    out = _fit(project, capsys, **change)
    assert "resuming from" not in out.replace("not resuming from", "")
    assert "not resuming from last.pt: " in out and part in out and "starting afresh" in out


def test_a_refused_resume_names_every_changed_setting_with_old_and_new_value(project, capsys):
    _fit(project, capsys, stop_at=1)
    out = _fit(
        project, capsys, **{"tasks.classification.image_size": 40, "tasks.classification.train.optimizer.lr": 0.002}
    )
    assert "not resuming from last.pt: the task's settings (image_size: 32 -> 40; train.optimizer.lr: " in out
    assert "-> 0.002) differs from this run; starting afresh" in out


def test_a_planted_checkpoint_is_refused_with_torchs_reason_in_full(tmp_path):
    class Planted:
        def __reduce__(self):
            return os.system, ("true",)

    torch.save({"epoch": 1, "payload": Planted()}, tmp_path / "last.pt")
    with pytest.raises(engine.CheckpointError) as err:
        engine.read_resume_checkpoint(tmp_path / "last.pt")
    reason = str(err.value)
    assert "UnpicklingError: Trying to load unsupported GLOBAL posix.system whose module posix is blocked.)" in reason
    assert "Weights only load failed" not in reason  # torch's advice to load it unsafely is not repeated


def test_strict_resume_refuses_another_run(project, capsys):
    _fit(project, capsys, stop_at=1)
    with pytest.raises(engine.CheckpointError, match=r"last.pt belongs to another run: data .*train.resume: strict"):
        _fit(project, capsys, data_version="v2", **{"tasks.classification.train.resume": "strict"})
    # train.resume itself is not part of the fingerprint: strict resumes the same run
    assert "resuming from last.pt after epoch 1" in _fit(
        project, capsys, **{"tasks.classification.train.resume": "strict"}
    )


def test_the_data_version_tag_is_the_validate_digest(project):
    import mlflow

    from tasks import normstats, validate

    params = project.params()
    report = validate.run("classification", params)
    normstats.run("classification", params)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("cv-classification")
    [run] = client.search_runs(
        [exp.experiment_id], "tags.stage = 'normstats'", order_by=["attributes.start_time DESC"], max_results=1
    )
    assert run.data.tags["data_version"] == report["data_version"]["all"]["digest"]
    assert run.data.tags[runstate.PID_TAG] == str(os.getpid()) and run.data.tags[runstate.HOST_TAG]


def test_outputs_follow_the_umask(tmp_path):
    from tasks.paths import atomic_dir, atomic_write_bytes

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            atomic_write_bytes(tmp / "model.pt", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "model.pt").stat().st_mode & 0o777 == 0o644


def test_wrong_shape_error_lists_each_key_once():
    from cv_models.weights import WeightsError, load_into

    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    state = {"0.weight": torch.zeros(5, 3), "0.bias": torch.zeros(4)}
    with pytest.raises(WeightsError) as err:
        load_into(model, state, "w.pt")
    assert str(err.value).count("0.weight") == 1 and "missing keys: none" in str(err.value)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_folders_of_dead_processes_are_removed(tmp_path):
    dead, alive = tmp_path / f".baseline.tmp-{_dead_pid()}-abc", tmp_path / f".augmented.tmp-{os.getpid()}-abc"
    old_style = tmp_path / ".evaluate.tmp-xyz"  # no owner recorded: left alone
    for d in (dead, alive, old_style):
        d.mkdir()
    assert runstate.remove_stale_tmp([tmp_path]) == [dead]
    assert alive.exists() and old_style.exists() and not dead.exists()


def test_a_stale_lock_is_taken_over(project):
    lock = runstate.LOCK_DIR / "classification.baseline.lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": runstate.host(), "started": "earlier"}))
    with runstate.stage_lock("classification", "baseline"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(runstate.StageBusy, match=f"held by pid {os.getpid()} on host"):
            with runstate.stage_lock("classification", "baseline"):
                pass
        with runstate.stage_lock("classification", "augmented"):  # another stage: its own lock
            pass


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_unwind_the_stage_and_restore_the_handlers(signum, tmp_path):
    from tasks.paths import atomic_dir

    before = signal.getsignal(signum)
    with pytest.raises(runstate.StageInterrupted) as err:
        with runstate.signals_interrupt(), atomic_dir(tmp_path / "out"):
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises here at once
    assert err.value.signum == signum
    assert list(tmp_path.iterdir()) == []  # the temporary folder went with it
    assert signal.getsignal(signum) is before
