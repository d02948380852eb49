"""Loading and checking ``params.yaml``, the single source of settings.

Every stage reads its settings through :func:`load_params`. Values are checked
with pydantic so that a wrong type or an out-of-range value stops the run with a
message naming the key, before anything is written.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A params value of the wrong type or out of range (the message names the key)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- training


class OptimizerConfig(Strict):
    name: Literal["sgd", "adamw", "adam"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    decay_norms_and_biases: bool = False  # weight decay on BatchNorm/LayerNorm weights and biases (usually off)
    momentum: float = Field(0.9, ge=0, lt=1)


class SchedulerConfig(Strict):
    name: Literal["none", "step", "cosine", "onecycle"] = "cosine"
    warmup: Literal["linear", "constant"] = "linear"  # ramp up, or a constant low lr, for warmup_epochs
    warmup_epochs: int = Field(0, ge=0)
    step_size: int = Field(10, gt=0)
    gamma: float = Field(0.1, gt=0, le=1)


class LossConfig(Strict):
    name: str = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: list[float] | None = None
    ignore_index: int = 255


class EarlyStoppingConfig(Strict):
    enabled: bool = False
    patience: int = Field(5, ge=1, description="epochs without a better validation metric before stopping")
    min_delta: float = Field(0.0, ge=0)


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=4096)
    eval_batch_size: int = Field(64, ge=1, le=4096)
    num_workers: int = Field(0, ge=0, le=64)
    num_threads: int = Field(0, ge=0, le=256, description="torch CPU threads; 0 = all cores")
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    loss: LossConfig = LossConfig()
    resume: bool = True
    device: str = "auto"
    grad_clip_norm: float = Field(0.0, ge=0, description="clip the gradient norm to this; 0 = off")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="exponential moving average of the weights; 0 = off")
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    track_train_metric: bool = True  # score a fixed train subset each epoch too (overfitting diagnosis)
    time_limit_minutes: float = Field(0.0, ge=0, description="stop before an epoch that would end past this wall time; "
                                                            "0 = off (size epochs to fit: the schedule spans all of them)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu") and not v.startswith("cuda"):
            raise ValueError("must be 'auto', 'cpu' or 'cuda[:N]'")
        return v


class ModelConfig(Strict):
    name: str = "small_cnn"
    # none | path to a local checkpoint | torchvision:<WeightsEnum member>, e.g. torchvision:DEFAULT
    weights: str = "none"
    freeze_backbone: bool = False  # train the head only
    frozen_layers: list[str] = []  # or freeze these layers by name prefix, e.g. [conv1, bn1, layer1]
    width: int = Field(32, ge=1, le=1024)
    depth: int = Field(3, ge=1, le=8)
    dropout: float = Field(0.0, ge=0, lt=1)
    options: dict[str, Any] = {}


class OverfitCheckConfig(Strict):
    """Train on one batch: healthy code drives the loss down relative to where it started. An absolute
    threshold does not transfer between datasets (a many-object detection loss starts and ends higher)."""

    enabled: bool = True
    batch_size: int = Field(8, ge=1)
    steps: int = Field(60, ge=1, description="step cap; the check stops early once it passes")
    lr: float = Field(3e-3, gt=0)
    max_loss_ratio: float = Field(0.35, gt=0, lt=1, description="pass when the loss falls below this fraction of "
                                                               "its first value")
    max_loss: float | None = Field(None, gt=0, description="optional: also pass when the loss falls below this")


# ---------------------------------------------------------------- augmentation


class Switch(Strict):
    enabled: bool = False
    p: float = Field(0.5, ge=0, le=1)


class RotationAug(Switch):
    degrees: float = Field(15, ge=0, le=180)
    fill: int = Field(0, ge=0, le=255)  # value of the corners the rotation uncovers


class CropAug(Switch):
    scale: tuple[float, float] = (0.6, 1.0)

    @model_validator(mode="after")
    def _range(self):
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        return self


class RescaleAug(Switch):
    scale: tuple[float, float] = (0.8, 1.2)

    @model_validator(mode="after")
    def _range(self):
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must satisfy 0 < low <= high, got {self.scale}")
        return self


class ColorAug(Switch):
    brightness: float = Field(0.3, ge=0)
    contrast: float = Field(0.3, ge=0)
    saturation: float = Field(0.3, ge=0)
    hue: float = Field(0.05, ge=0, le=0.5)


class NoiseAug(Switch):
    sigma: float = Field(0.05, ge=0, le=1)


class BlurAug(Switch):
    kernel_size: int = Field(3, ge=1)
    sigma: tuple[float, float] = (0.1, 1.5)

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("kernel_size must be odd")
        return v


class CutoutAug(Switch):
    scale: tuple[float, float] = (0.02, 0.2)
    # segmentation: what the erased region's mask becomes ("ignore" or "keep")
    mask_fill: Literal["ignore", "keep"] = "ignore"


class MixAug(Switch):
    alpha: float = Field(1.0, gt=0)


class AugmentConfig(Strict):
    """Each augmentation is switchable, with its strength; the baseline stage ignores all of them."""

    hflip: Switch = Switch()
    vflip: Switch = Switch()
    rotation: RotationAug = RotationAug()
    crop: CropAug = CropAug()
    rescale: RescaleAug = RescaleAug()
    color: ColorAug = ColorAug()
    noise: NoiseAug = NoiseAug()
    blur: BlurAug = BlurAug()
    cutout: CutoutAug = CutoutAug()
    mixup: MixAug = MixAug()
    cutmix: MixAug = MixAug()
    options: dict[str, Any] = {}  # task-specific extras (mosaic, copy-paste, ...)

    def enabled_names(self) -> list[str]:
        return [name for name in type(self).model_fields if name != "options" and getattr(self, name).enabled]


# ---------------------------------------------------------------- data


class DataConfig(Strict):
    format: str = "imagefolder"
    path: str
    classes: list[str] | None = None  # declared class set; None = read from the data
    split_from: Literal["folders", "seed"] = "folders"
    split_seed: int = 0
    split_fractions: dict[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}
    color_mode: Literal["convert", "reject"] = "convert"  # grayscale / RGBA / palette images
    min_size: int = Field(8, ge=1)
    max_size: int = Field(8192, ge=1)
    options: dict[str, Any] = {}  # task-specific reader options

    @model_validator(mode="after")
    def _check(self):
        fr = self.split_fractions
        if set(fr) != {"train", "val", "test"} or any(v <= 0 for v in fr.values()) or abs(sum(fr.values()) - 1) > 1e-6:
            raise ValueError(f"split_fractions needs positive train, val and test summing to 1, got {fr}")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} is above max_size {self.max_size}")
        return self


class TaskConfig(Strict):
    """Settings of one CV task (``tasks.<name>`` in params.yaml)."""

    data: DataConfig
    image_size: int = Field(64, ge=8, le=4096)
    normalization: Literal["none", "mean_image", "per_channel_mean", "per_channel_std"] = "per_channel_std"
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    overfit_check: OverfitCheckConfig = OverfitCheckConfig()
    augment: AugmentConfig = AugmentConfig()
    preview_samples: int = Field(16, ge=1, le=256)
    options: dict[str, Any] = {}


class ShapesConfig(Strict):
    out_dir: str = "data/shapes"
    seed: int = 0
    image_size: int = Field(64, ge=16, le=1024)
    classes: list[str] = ["circle", "square", "triangle", "star"]
    splits: dict[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}
    classification: dict[str, Any] = {"num_images": 1200}
    scenes: dict[str, Any] = {"num_images": 300, "image_size": 128, "max_objects": 4}

    @field_validator("classes")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from cv_models.data.shapes import SHAPE_VERTICES

        unknown = [c for c in v if c not in SHAPE_VERTICES]
        if unknown or len(v) < 2:
            raise ValueError(f"need at least two of {sorted(SHAPE_VERTICES)}, got {v}")
        return v


class TrackingConfig(Strict):
    uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlartifacts"
    experiment_prefix: str = "cv-"


class CropsConfig(Strict):
    """Object crops of a detection task's train split as an ImageFolder (``python -m tasks crops``), a
    pretraining dataset made of the objects themselves: ``pretrain.data: <out>``, ``split_from: seed``."""

    task: str = "detection"  # a task with boxes
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
    num_threads: int = Field(0, ge=0)
    augment: AugmentConfig = AugmentConfig()  # the pretraining data's augmentations (all off unless switched on)
    out: str = "models/pretrain/backbone.pt"


class Params(Strict):
    seed: int = Field(42, ge=0, le=2**32 - 1)
    pretrain: PretrainConfig = PretrainConfig()
    crops: CropsConfig = CropsConfig()
    tracking: TrackingConfig = TrackingConfig()
    shapes: ShapesConfig = ShapesConfig()
    tasks: dict[str, dict[str, Any]]
    # experiments over a task (checked by tasks/ablation.py and tasks/search.py when they start)
    ablation: dict[str, Any] = {}
    search: dict[str, Any] = {}

    def task(self, name: str) -> TaskConfig:
        if name not in self.tasks:
            raise ConfigError(f"params.yaml has no section tasks.{name}; tasks present: {sorted(self.tasks)}")
        try:
            return TaskConfig.model_validate(self.tasks[name])
        except ValidationError as err:
            raise ConfigError(_describe(err, prefix=f"tasks.{name}.")) from None


def _describe(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = prefix + ".".join(str(p) for p in e["loc"])
        lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid value in params.yaml:\n" + "\n".join(lines)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def load_raw(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> dict:
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


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read params.yaml, apply dotted-key overrides (``{"tasks.classification.train.epochs": 1}``), check all."""
    raw = load_raw(path, overrides)
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None
    for name in params.tasks:  # check every task section up front
        params.task(name)
    return params


def config_hash(obj: Any) -> str:
    """Stable short hash of a config (pydantic model or plain data), for resume safety and run ids."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
