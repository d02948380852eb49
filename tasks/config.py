"""Loading and checking ``params.yaml``, the single source of settings.

Every stage reads its settings through :func:`load_params`. Values are checked with pydantic so that a
wrong type, an out-of-range value or an unknown key stops the run with a message naming the dotted key,
before anything is written. The schema of a task's section lives below both packages, in
:mod:`cv_models.settings` (shared classes) and in each task module (its options); this module holds the
pipeline-level sections and re-exports the shared names so ``from tasks.config import TrainConfig`` works.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, PrivateAttr, SerializeAsAny, ValidationError, field_validator

from cv_models.settings import (  # noqa: F401  (re-exported: the public names of the schema)
    AugmentConfig,
    BlurAug,
    ColorAug,
    ConfigError,
    CropAug,
    CutoutAug,
    DataConfig,
    DeviceName,
    EarlyStoppingConfig,
    LossConfig,
    MixAug,
    ModelConfig,
    NoiseAug,
    NoOptions,
    OptimizerConfig,
    OverfitCheckConfig,
    RescaleAug,
    RotationAug,
    SchedulerConfig,
    Strict,
    Switch,
    TaskConfig,
    TrainConfig,
    describe,
    did_you_mean,
)
from cv_models.data.shapes import ShapesClassification, ShapesConfig, ShapesScenes  # noqa: F401  (the generator's schema)
from tasks.runners.experiment_settings import AblationConfig, SearchConfig


class TrackingConfig(Strict):
    uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlartifacts"
    experiment_prefix: str = "cv-"


class RegistryConfig(Strict):
    """The evaluate stage's MLflow model: logged, registered as <name_prefix><task> and given ``alias`` when it
    beats the current holder's validation metric on the same data version."""

    enabled: bool = True
    name_prefix: str = "cv-"  # cv-classification, cv-segmentation, cv-detection, cv-instance-segmentation
    alias: str = "champion"


class ServingConfig(Strict):
    """``python -m tasks.use.serve_model``: a registered model over HTTP (MLflow's scoring server); requests whose
    body is larger than ``max_request_mb`` get HTTP 413 (stock ``mlflow models serve`` has no limit)."""

    host: str = "127.0.0.1"
    port: int = Field(5001, ge=1, le=65535)
    max_request_mb: float = Field(32, gt=0)


class CropsConfig(Strict):
    """Object crops of a detection or instance-segmentation task's train split as an ImageFolder
    (``python -m tasks crops``), a pretraining dataset made of the objects themselves: ``pretrain.data: <out>``,
    ``split_from: seed``."""

    task: str = "detection"  # a task with boxes: detection or instance_segmentation
    # kept: the classes the task trains on | all: every class of the dataset, also those the task's
    # data.options.keep_classes leaves out (a backbone learns from every object; the train split is the same)
    classes: Literal["kept", "all"] = "kept"
    out: str = "data/crops/detection"
    size: int = Field(64, ge=8, le=1024)  # crops are resized to size x size
    context: float = Field(0.2, ge=0, le=2)  # margin around the box, as a fraction of its longer side


class PretrainConfig(Strict):
    """The pretraining stage: a classifier trained on one task's data, whose trunk other tasks reuse."""

    data: str = "data/shapes/classification"  # an ImageFolder dataset
    split_from: Literal["folders", "seed"] = "folders"
    model: str = "resnet18"  # a torchvision classifier; detection/segmentation backbones of the same family load it
    image_size: int = Field(32, ge=8, le=4096)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    num_threads: int = Field(1, ge=0)  # 1: bitwise-repeatable; 0 = all cores
    device: DeviceName = "auto"  # auto = CUDA when present, else cpu; or cpu, cuda, cuda:1
    augment: AugmentConfig = AugmentConfig()  # the pretraining data's augmentations (all off unless switched on)
    out: str = "models/pretrain/backbone.pt"


class Params(Strict):
    seed: int = Field(42, ge=0, le=2**32 - 1)
    pretrain: PretrainConfig = PretrainConfig()
    crops: CropsConfig = CropsConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()
    serving: ServingConfig = ServingConfig()
    shapes: ShapesConfig = ShapesConfig()
    # tasks.<name>: each section checked against the schema its CV task declares (the registry in cv_models), so
    # params.tasks[name] is that task's own TaskConfig subclass
    tasks: dict[str, SerializeAsAny[TaskConfig]]
    # experiments over a task (schemas: tasks/runners/experiment_settings.py; run by tasks/runners/)
    ablation: AblationConfig = AblationConfig()
    search: SearchConfig = Field(default_factory=dict, validate_default=True)  # a missing one is refused: no space
    _unread: list[str] = PrivateAttr(default_factory=list)  # task sections load_params(check_tasks=False) left out

    @field_validator("ablation", "search", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return {} if value is None else value  # a section with nothing under it: its defaults

    @field_validator("tasks", mode="before")
    @classmethod
    def _typed_tasks(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value  # pydantic names the type error
        typed: dict[str, TaskConfig] = {}
        errors: list[str] = []
        for name, section in value.items():
            try:
                typed[name] = check_task(name, section)
            except ConfigError as err:
                errors.append(str(err))
        if errors:  # every task's problems at once, each line naming its dotted key (see describe)
            raise ConfigError("\n".join(errors))
        return typed

    def task(self, name: str) -> TaskConfig:
        """``tasks.<name>``, checked against the schema its CV task declares when the params were loaded."""
        if name not in self.tasks:
            unread = " (not read: load_params(check_tasks=False))" if name in self._unread else ""
            raise ConfigError(
                f"params.yaml has no section tasks.{name}{unread}; tasks present: {sorted(self.tasks)}"
                + did_you_mean(name, sorted(self.tasks))
            )
        return self.tasks[name]


def check_task(name: str, section: Any) -> TaskConfig:
    """``tasks.<name>`` checked against the schema its CV task declares (the registry in :mod:`cv_models`)."""
    from cv_models import TASKS
    from cv_models.settings import validate_task

    if name not in TASKS:
        raise ConfigError(
            f"tasks.{name}: no CV task is registered under that name; registered: {sorted(TASKS)}"
            + did_you_mean(name, sorted(TASKS))
        )
    return validate_task(TASKS[name].settings, section, name)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def load_raw(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    raw = copy.deepcopy(raw)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return raw


def load_params(
    path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None, check_tasks: bool = True
) -> Params:
    """Read params.yaml, apply dotted-key overrides (``{"tasks.classification.train.epochs": 1}``), check all.
    ``check_tasks=False``: all but the sections under ``tasks:``, which are left out (``params.tasks`` is empty), for
    a stage that reads no task, ``generate``: it then starts without the task modules (torch, torchvision)."""
    raw = load_raw(path, overrides)
    sections = raw.get("tasks")
    unread = list(sections) if not check_tasks and isinstance(sections, dict) else []
    try:
        params = Params.model_validate({**raw, "tasks": {}} if unread else raw)
    except ValidationError as err:
        raise ConfigError(describe(err, Params)) from None
    params._unread = unread
    return params


def config_hash(obj: Any) -> str:
    """Stable short hash of a config (pydantic model or plain data), for resume safety and run ids."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
