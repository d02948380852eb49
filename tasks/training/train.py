"""Shared by the baseline and augmented stages: train one model and record it."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from torch.utils.data import Dataset

from cv_models.data.cache import CachedDataset, cache_key, split_transforms
from cv_models.settings import ConfigError
from tasks.training import engine
from tasks.config import AugmentConfig
from tasks.track.data_version import read_data_version
from tasks.paths import checkpoints, models, outputs
from tasks.training.seeding import init_seed, isolated_rng, seed_everything, state_sha256
from tasks.stage import Stage, write_json
from cv_models.visualise import history_figure


def normalizer(st: Stage):
    """``normalization`` from the normstats stage's statistics, or the pretrained weights' own convention."""
    return st.task.input_normalizer(outputs(st.task_name, "normstats"))


def initial_model(st: Stage) -> tuple[torch.nn.Module, str]:
    """The task's model with its initial weights drawn from the seed alone, and their SHA-256.

    Built under its own seeded generators (the global ones are put back afterwards), so whatever a stage draws
    before (an overfit check, an augmentation preview) cannot change the starting point: baseline, augmented,
    every ablation arm and search trial of one seed start from the same weights."""
    return initial_weights(st.task, st.params.seed)


def initial_weights(task, seed: int) -> tuple[torch.nn.Module, str]:
    """:func:`initial_model` for a task object and a seed (the overfit check builds its model with this too)."""
    with isolated_rng(init_seed(seed)):
        model = task.build_model()
    return model, state_sha256(model)


def cached(st: Stage, split: str, transforms) -> Dataset:
    """The task's ``split`` with ``transforms``, decoded and resized once when ``data.cache`` says so
    (cv_models/data/cache.py; the results are those of ``cache: none``)."""
    data = st.task.dataset(split, transforms)
    d = st.cfg.data
    if d.cache == "none":
        return data
    digest = read_data_version(st.task_name, split)["digest"]
    if d.cache == "disk" and digest == "unknown":
        raise ConfigError(
            f"data.cache: disk keys its files by the data version, which the validate stage writes; run "
            f"it first (python -m tasks validate {st.task_name}) or set data.cache: ram"
        )
    # what a kept sample depends on: the data, what the reader was told, the split and the resize (training size)
    reader = d.model_dump(mode="json", exclude={"cache", "cache_max_gb"})
    prefix, _ = split_transforms(transforms)
    key = cache_key(
        st.task_name,
        digest,
        reader,
        str(Path(d.path).resolve()),
        split,
        len(data),
        type(data).__name__,
        repr(prefix),
        st.cfg.image_size,
    )
    return CachedDataset(data, d.cache, key, d.cache_max_gb, label=f"{st.task_name}/{split}")


def subset(task, data: Dataset, indices: list[int]) -> Dataset:
    return data.subset(task, indices) if isinstance(data, CachedDataset) else task.subset(data, indices)


def train_model(
    st: Stage, augment: AugmentConfig | None, out_dir: Path, keep_checkpoint: bool = False
) -> tuple[engine.FitResult, Path]:
    """Fit the task's model with (or without) augmentations; best weights to ``models/<task>/<stage>/model.pt``.
    ``keep_checkpoint``: the finished run's checkpoint stays, marked done. A kill after training (before the
    stage's outputs are committed, or before DVC writes its lock file) and a rerun with the same settings,
    seed, code and data then rewrite the outputs without training again; the next different run replaces it."""
    norm = normalizer(st)
    train = cached(st, "train", st.task.train_transforms(augment, norm))
    val = cached(st, "val", st.task.eval_transforms(norm))
    train_eval = train_eval_set(st, norm, val) if st.cfg.train.track_train_metric else None
    model, init_hash = initial_model(st)
    # with model.weights: imagenet, where those weights came from (source, sha256, key mapping) and the normalisation
    st.log_params({"init_weights_sha256": init_hash, **st.task.weights_record})
    # the augmentation stream starts from the seed too, whatever ran before in this process
    seed_everything(st.params.seed)
    model_path = models(st.task_name, st.name) / "model.pt"
    result = engine.fit(
        st.task,
        model,
        train,
        val,
        st.cfg.train,
        st.params.seed,
        model_path,
        checkpoint_path=checkpoints(st.task_name, st.name) / "last.pt",
        mixer=st.task.batch_mixer(augment),
        log_metrics=lambda m, step: st.log_metrics(m, step=step),
        desc=f"{st.task_name}/{st.name}",
        extra_state={
            "augment": augment.model_dump(mode="json") if augment else None,
            "model": st.cfg.model.model_dump(mode="json"),
            "normalization": st.cfg.normalization,
        },
        train_eval_set=train_eval,
        data_version=read_data_version(st.task_name)["digest"],  # resume only onto the same data
        keep_checkpoint=keep_checkpoint,
    )
    result.warnings = silent_failures(st, result, val)
    record(st, result, out_dir, model_path)
    return result, model_path


def train_eval_set(st: Stage, norm, val: Dataset) -> Dataset:
    """The same number of training images as validation images, unaugmented: the overfitting diagnosis compares
    them. Stratified and seeded: the first N of a sorted folder listing can all be one class."""
    train_plain = cached(st, "train", st.task.eval_transforms(norm))  # the same kept samples as ``train``'s
    indices = engine.stratified_indices(
        st.task.sample_labels(train_plain), min(len(train_plain), len(val)), st.params.seed, size=len(train_plain)
    )
    return subset(st.task, train_plain, indices)


def silent_failures(st: Stage, result: engine.FitResult, val: Dataset) -> list[str]:
    """No silent failure: a model at the dummy's level or predicting one class is said so, loudly."""
    m = st.task.primary_metric
    dummy = st.task.dummy_result(st.task.dataset("train", None), val)
    lines = engine.silent_failure_warnings(
        result.best_metrics, dummy.metrics, m, len(st.task.class_names()), f"{st.task_name}/{st.name} (validation)"
    )
    for line in lines:
        print(f"[{st.name}] WARNING: {line}")
        warnings.warn(line, engine.SilentFailureWarning, stacklevel=3)
    return lines


def record(st: Stage, result: engine.FitResult, out_dir: Path, model_path: Path) -> None:
    """history.csv and its picture in ``out_dir``; MLflow: the best validation metrics, times, the model and data."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result.history.to_csv(out_dir / "history.csv", index=False)
    history_figure(result.history, st.task.primary_metric, out_dir / "history.png")
    st.log_metrics(
        {f"best_val_{k}": v for k, v in result.best_metrics.items()}
        | {"train_seconds": result.seconds, "best_epoch": result.best_epoch}
        | budget_figures(result)
        | {"epochs_planned": result.planned, "final_lr": result.final_lr}
    )
    st.log_artifacts(model_path, "model")
    st.log_inputs("train", "val")
    st.log_model(model_path, {f"best_val_{k}": v for k, v in result.best_metrics.items()})


def summary_metrics(st: Stage, result: engine.FitResult) -> dict:
    m = st.task.primary_metric
    # no wall-clock figures here: identical runs give identical metrics.json (timings go to timings.json and MLflow)
    return {
        f"val_{m}": result.best_metrics[m],
        "best_epoch": result.best_epoch,
        "epochs": result.planned,  # the plan: train.epochs, or those that fitted train.time_limit_minutes
        "epochs_cap": st.cfg.train.epochs,  # train.epochs, the most a run may plan
        "epochs_run": len(result.history),  # fewer than planned after early stopping or a stop at the time limit
        "final_lr": result.final_lr,  # the learning rate after the last epoch: with a time limit, the schedule's end
        "warnings": list(getattr(result, "warnings", [])),
    }


def preview(st: Stage, augment: AugmentConfig | None, path: Path) -> Path:
    """A grid of training samples exactly as the model sees them (after batch mixing), un-normalised."""
    from cv_models.visualise import save_grid

    norm = normalizer(st)
    data = st.task.dataset("train", st.task.train_transforms(augment, norm))
    n = min(st.cfg.preview_samples, len(data))
    g = torch.Generator().manual_seed(st.params.seed)
    loader = engine.make_loader(st.task, data, n, True, st.params.seed)
    loader.generator.manual_seed(st.params.seed)
    images, targets = next(iter(loader))
    mixer = st.task.batch_mixer(augment)
    if mixer is not None:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        images, targets = mixer(images, targets)
    pictures = [st.task.draw(st.task.display_image(images[i], norm), targets[i]) for i in range(n)]
    return save_grid(pictures, path)


def write_metrics(out_dir: Path, metrics: dict, timings: dict | None = None) -> None:
    """``metrics.json`` (repeatable: what DVC compares) and ``timings.json`` beside it (wall-clock figures)."""
    write_json(out_dir / "metrics.json", metrics)
    if timings is not None:
        write_json(out_dir / "timings.json", timings)


def budget_figures(result: engine.FitResult) -> dict:
    """With a time limit: the limit, the share of it training used and where the schedule ends (else nothing)."""
    if not result.time_limit_s:
        return {}
    figures = {"time_limit_seconds": result.time_limit_s, "budget_use": result.seconds / result.time_limit_s}
    return figures | ({"schedule_end_lr": result.end_lr} if result.end_lr is not None else {})


def timings(result: engine.FitResult) -> dict:
    return {"train_seconds": round(result.seconds, 2)} | budget_figures(result)
