"""last.pt every train.checkpoint_every epochs and written in a background thread (tasks/training/checkpointing.py, issue 33):
what is trained does not change, and an interrupted run still resumes from the last file written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cv_models import get_task
from tasks.config import load_params
from tasks.training import checkpointing, engine
from tests.conftest import REPO


def _setup(project, **train):
    t = "tasks.classification.train."
    params = project.params(
        **{
            t + "epochs": 4,
            t + "batch_size": 16,
            t + "track_train_metric": False,
            **{t + k: v for k, v in train.items()},
        }
    )
    cfg = load_params(params).task("classification")
    task = get_task("classification", cfg)
    train_set = task.subset(task.dataset("train", task.train_transforms(cfg.augment, None)), list(range(0, 320, 5)))
    val = task.subset(task.dataset("val", task.eval_transforms(None)), list(range(32)))

    def fit(folder: str, stop_at: int | None = None):
        def log(metrics, epoch):
            if epoch == stop_at:
                raise KeyboardInterrupt

        torch.manual_seed(0)
        return engine.fit(
            task,
            task.build_model(),
            train_set,
            val,
            cfg.train,
            0,
            Path(folder) / "model.pt",
            Path(folder) / "last.pt",
            log_metrics=log,
        )

    return fit


def _weights(folder: str) -> dict:
    return torch.load(Path(folder) / "model.pt", weights_only=True)["model"]


def test_checkpoint_every_two_epochs_resumes_from_the_last_written(project, capsys):
    straight = _setup(project)("a")
    fit = _setup(project, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        fit("b", stop_at=3)  # epoch 3's metrics logged, its checkpoint not due
    assert torch.load("b/last.pt", weights_only=True)["epoch"] == 2
    resumed = fit("b")
    assert "resuming from b/last.pt after epoch 2" in capsys.readouterr().out
    assert resumed.history["val_accuracy"].tolist() == straight.history["val_accuracy"].tolist()
    assert all(torch.equal(v, _weights("b")[k]) for k, v in _weights("a").items())
    assert not Path("b/last.pt").exists()


def test_background_checkpoint_trains_the_same_and_resumes(project, capsys):
    straight = _setup(project, checkpoint_background=False)("a")
    fit = _setup(project, checkpoint_background=True)
    with pytest.raises(KeyboardInterrupt):
        fit("b", stop_at=2)
    resumed = fit("b")  # waits for the interrupted run's write before reading the file
    assert "resuming from b/last.pt after epoch 2" in capsys.readouterr().out
    assert resumed.history["val_accuracy"].tolist() == straight.history["val_accuracy"].tolist()
    assert all(torch.equal(v, _weights("b")[k]) for k, v in _weights("a").items())
    assert not Path("b/last.pt").exists()


def test_background_writer_copies_the_state_and_raises_its_error(tmp_path):
    written = {}
    writer = checkpointing.BackgroundWriter(lambda path, state: written.update(state))
    weights = torch.zeros(3)
    writer.submit(tmp_path / "last.pt", {"w": weights, "history": [{"epoch": 1}]})
    weights += 1  # training goes on at once: the file keeps the state as it was
    writer.wait()
    assert torch.equal(written["w"], torch.zeros(3)) and written["history"] == [{"epoch": 1}]

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    writer = checkpointing.BackgroundWriter(engine.write_checkpoint)
    writer.submit(blocked / "last.pt", {"w": weights})  # its folder is a file: the write fails in the thread
    with pytest.raises(OSError):
        writer.wait()


def test_checkpoint_due():
    assert [e for e in range(1, 8) if checkpointing.due(e, 7, 3, False)] == [3, 6, 7]
    assert checkpointing.due(4, 7, 3, True)  # the epoch a time limit stops at
    assert checkpointing.in_background("auto", torch.device("cpu")) is False
    assert checkpointing.in_background("auto", torch.device("cuda")) is True


def test_the_code_fingerprint_covers_every_module_of_the_task_package(project):
    """A task is a package (cv_models/<task>/): an edit to any of its modules, not only the one that defines the
    class, must stop a resume from a checkpoint of the old code. A task class outside cv_models/ hashes its file."""
    cfg = load_params(project.params()).task("detection")
    task = get_task("detection", cfg)
    package = REPO / "cv_models" / "detection"
    sources = {Path(p) for p in engine.task_sources(task)}
    assert {package / "task.py", package / "scoring.py", package / "report.py"} <= sources
    assert sources == set(package.glob("*.py"))

    class Stub(type(task)):
        pass

    assert engine.task_sources(Stub(cfg)) == {__file__}
