"""A trained model made ready for use, from wherever it lives: a training stage's ``model.pt``, a model
bundle folder, or the MLflow Model Registry (``models:/cv-<task>@champion``).

A *bundle* is what leaves the project (MLflow models, exports): ``model.pt`` (the weights, as the
training stages save them), ``task.json`` (task name, class list, the settings needed to rebuild the
network without its dataset) and ``normstats/`` (the training split's statistics the inputs are
normalised with). Every checkpoint is read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cv_models.base import CVTask
from tasks.chain import TRAINED
from tasks.paths import models, outputs

TASK_FILE = "task.json"


class ModelError(ValueError):
    """The model asked for cannot be used: missing, of another task, or unreadable."""


@dataclass
class Loaded:
    task: CVTask
    model: nn.Module
    normalize: Callable | None
    source: str  # what was loaded, in words
    info: dict[str, Any] = field(default_factory=dict)  # val_metrics, epoch, stage, registry version ...


def _build(
    task_name: str, config: dict, class_names: list[str], state: dict, normstats_dir: Path, source: str, info: dict
) -> Loaded:
    from cv_models import TASKS

    if task_name not in TASKS:
        raise ModelError(f"{source}: unknown task {task_name!r}; registered: {sorted(TASKS)}")
    cfg = TASKS[task_name].settings.model_validate(config)  # the task's own typed schema
    # the class list comes with the model (no dataset is read); the saved weights replace any initial weights
    options = cfg.model.options
    trunks = {"backbone_weights": "none", "weights_backbone": None}  # pretrained trunks are in the saved weights too
    options = options.model_copy(update={k: v for k, v in trunks.items() if k in type(options).model_fields})
    cfg = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"classes": list(class_names)}),
            "model": cfg.model.model_copy(update={"options": options}),
        }
    )
    task = TASKS[task_name].for_saved_weights(cfg)  # weights: imagenet kept: the input normalisation goes with it
    task.normstats_dir = Path(normstats_dir)
    if not (Path(normstats_dir) / "stats.json").exists() and cfg.normalization != "none":
        raise ModelError(
            f"{normstats_dir}/stats.json is missing: the model needs the normstats stage's statistics "
            f"(run `dvc repro normstats@{task_name}` or use a model bundle)"
        )
    model = task.build_model()
    model.load_state_dict(state)
    normalize = task.input_normalizer(normstats_dir)  # the pretrained weights' convention for weights: imagenet
    return Loaded(task, model.eval(), normalize, source, info)


def _read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read is the same answer for the user
        raise ModelError(
            f"{path}: not readable as a model file of this pipeline ({type(err).__name__}: {err})"
        ) from None


def _check_task(found: str | None, expected: str, where: str) -> None:
    if found != expected:
        raise ModelError(f"{where} is a {found!r} model, not {expected!r}: pass --task {found} or a {expected} model")


def load_checkpoint(task_name: str, path: Path, normstats_dir: Path | None = None) -> Loaded:
    """A training stage's ``model.pt``; normalised with ``normstats_dir`` (default: this project's normstats output)."""
    blob = _read_checkpoint(path)
    if not isinstance(blob, dict) or "model" not in blob or "config" not in blob:
        raise ModelError(f"{path}: not a model file of this pipeline (no weights and settings in it)")
    _check_task(blob.get("task"), task_name, str(path))
    info = {"val_metrics": blob.get("val_metrics", {}), "epoch": blob.get("epoch")}
    return _build(
        task_name,
        blob["config"],
        blob["class_names"],
        blob["model"],
        Path(normstats_dir or outputs(task_name, "normstats")),
        str(path),
        info,
    )


def load_bundle(task_name: str | None, folder: Path) -> Loaded:
    meta = json.loads((folder / TASK_FILE).read_text())
    if task_name is not None:
        _check_task(meta["task"], task_name, str(folder))
    blob = _read_checkpoint(folder / "model.pt")
    return _build(
        meta["task"],
        meta["config"],
        meta["class_names"],
        blob["model"],
        folder / "normstats",
        str(folder),
        {k: v for k, v in meta.items() if k not in ("config", "class_names")},
    )


def write_bundle(task: CVTask, model_path: Path, folder: Path, extra: dict | None = None) -> Path:
    """``model.pt``, ``task.json`` and ``normstats/`` in ``folder``: the model usable without this project's data."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(model_path, folder / "model.pt")
    blob = _read_checkpoint(model_path)
    meta = {
        "task": task.name,
        "class_names": task.class_names(),
        "primary_metric": task.primary_metric,
        "image_size": task.cfg.image_size,
        "normalization": task.cfg.normalization,
        "val_metrics": blob.get("val_metrics", {}),
        "config": task.inference_config().model_dump(mode="json"),
        **(extra or {}),
    }
    (folder / TASK_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    stats = Path(task.normstats_dir or outputs(task.name, "normstats"))
    (folder / "normstats").mkdir(exist_ok=True)
    for name in ("stats.json", "mean_image.npy"):
        if (stats / name).exists():
            shutil.copy2(stats / name, folder / "normstats" / name)
    return folder


def best_stage(task_name: str, primary: str) -> str:
    """baseline or augmented, whichever has the better validation metric (the test split is never used to choose)."""
    scores = {}
    for stage in TRAINED:
        path = models(task_name, stage) / "model.pt"
        if path.exists():
            scores[stage] = float(_read_checkpoint(path).get("val_metrics", {}).get(primary, float("-inf")))
    if not scores:
        raise ModelError(
            f"no trained model in {models(task_name, '*')}/model.pt: run the training stages first (dvc repro)"
        )
    return max(scores, key=lambda s: (scores[s], s == TRAINED[0]))  # a tie keeps the plainer model


def find_bundle(folder: Path) -> Path | None:
    hits = sorted(folder.rglob(TASK_FILE))
    return hits[0].parent if hits else None


def load(task_name: str, spec: str, tracking_uri: str | None = None) -> Loaded:
    """``spec``: baseline | augmented | best | a model.pt or bundle folder | models:/<name>@<alias> or /<version>."""
    from cv_models import TASKS

    if task_name not in TASKS:
        raise ModelError(f"unknown task {task_name!r}; tasks: {sorted(TASKS)}")
    if spec == "best":
        spec = best_stage(task_name, TASKS[task_name].primary_metric)
    if spec in TRAINED:
        path = models(task_name, spec) / "model.pt"
        if not path.exists():
            raise ModelError(f"{path} is missing: run the {spec} stage first (dvc repro)")
        loaded = load_checkpoint(task_name, path)
        loaded.info["stage"] = spec
        return loaded
    if spec.startswith("models:/"):
        return load_registered(task_name, spec, tracking_uri)
    path = Path(spec)
    if path.is_dir():
        bundle = find_bundle(path)
        if bundle is None:
            raise ModelError(f"{path}: no {TASK_FILE} in this folder (not a model bundle)")
        return load_bundle(task_name, bundle)
    if path.is_file():
        return load_checkpoint(task_name, path)
    raise ModelError(f"--model {spec!r}: not {', '.join(TRAINED)}, best, an existing file or folder, or a models:/ URI")


def load_registered(task_name: str | None, uri: str, tracking_uri: str | None = None) -> Loaded:
    """A registered model version's bundle, downloaded from the tracking store's artifacts."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    target = Path(tempfile.mkdtemp(prefix="cv-model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except Exception as err:  # noqa: BLE001 - unknown name, alias or version
        raise ModelError(
            f"{uri}: cannot be loaded from the tracking store {mlflow.get_tracking_uri()} "
            f"({type(err).__name__}: {str(err)[:300]})"
        ) from None
    bundle = find_bundle(local)
    if bundle is None:
        raise ModelError(f"{uri}: holds no model bundle ({TASK_FILE}); it was not logged by this pipeline")
    loaded = load_bundle(task_name, bundle)
    loaded.source = uri
    return loaded
