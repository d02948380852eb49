"""The settings schema shared by every CV task, below both packages: ``cv_models`` and ``tasks`` import it,
it imports neither.

A task's settings (``tasks.<name>`` in params.yaml) are :class:`TaskConfig` with the task's own typed
``options`` sections: each task module declares pydantic models for its data, model, augment and task
options and combines them with :func:`task_settings`. Defaults live in these classes, not in the code
that reads them. Every section forbids unknown keys; :func:`describe` names the offending key with its
full dotted path and suggests the closest known key ("did you mean").
"""

from __future__ import annotations

import difflib
import typing
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A params value of the wrong type or out of range (the message names the key)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# a count a task may size from its data: a positive int, or "auto" (cv_models/sizing.py picks it from the busiest image)
AutoCount = Annotated[int, Field(ge=1)] | Literal["auto"]


class NoOptions(Strict):
    """An ``options`` section of a task that takes none: any key in it is an error."""


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
    # the warmup's rates as fractions of optimizer.lr: linear ramps up from warmup_start_factor, constant holds
    # constant_warmup_factor; one-cycle rises for onecycle_pct_start of its steps when warmup_epochs is 0
    warmup_start_factor: float = Field(0.01, gt=0, le=1)
    constant_warmup_factor: float = Field(0.1, gt=0, le=1)
    onecycle_pct_start: float = Field(0.3, gt=0, lt=1)


class LossConfig(Strict):
    name: str = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: list[float] | None = None
    ignore_index: int = 255


class EarlyStoppingConfig(Strict):
    enabled: bool = False
    patience: int = Field(5, ge=1, description="epochs without a better validation metric before stopping")
    min_delta: float = Field(0.0, ge=0)


def _device_name(v: str) -> str:
    if v not in ("auto", "cpu") and not v.startswith("cuda"):
        raise ValueError("must be 'auto', 'cpu' or 'cuda[:N]'")
    return v


# where a model trains: auto (CUDA when present, cuda:<LOCAL_RANK> under torchrun), cpu, cuda or cuda:N
DeviceName = Annotated[str, AfterValidator(_device_name)]


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=4096)
    eval_batch_size: int = Field(64, ge=1, le=4096)
    # DataLoader worker processes; auto: 0 on <= 2 cores (a worker there costs more than it saves), else the cores
    # left over by num_threads, at most 8 (tasks/training/engine.py worker_count). Results depend on the number of workers
    num_workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = "auto"
    # torch CPU threads; 0 = all cores. 1 (the default) gives bitwise-equal runs; more threads are faster on free
    # cores but some CPU kernels then reduce in a varying order (run-to-run differences in the last digits)
    num_threads: int = Field(1, ge=0, le=256, description="torch CPU threads; 0 = all cores")
    # torch.use_deterministic_algorithms (warn-only) and cuDNN's deterministic mode; false trades repeatability for
    # speed (cuDNN autotunes); auto: on for the CPU, off on a GPU (tasks/training/engine.py deterministic_kernels says why)
    deterministic: bool | Literal["auto"] = "auto"
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    loss: LossConfig = LossConfig()
    # true: continue from checkpoints/<task>/<stage>/last.pt when it was made by the same run (settings, seed, code,
    # data), else start afresh saying why; strict: refuse to start when it was not; false: always start afresh
    resume: bool | Literal["strict"] = True
    # epochs between writes of last.pt (the last epoch and a time-limit stop are always written): a kill loses at
    # most this many epochs; and whether a background thread writes it (auto: on a GPU, not on the CPU). Neither
    # changes results (tasks/training/checkpointing.py)
    checkpoint_every: int = Field(1, ge=1)
    checkpoint_background: bool | Literal["auto"] = "auto"
    device: DeviceName = "auto"
    # accelerator settings (tasks/training/accelerate.py); the defaults leave one-CPU results unchanged
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; fp16 adds a GradScaler
    channels_last: bool = False  # NHWC memory format for models and image batches (faster convs on GPUs)
    compile: bool = False  # torch.compile the training forward (first steps pay the compile time)
    grad_clip_norm: float = Field(0.0, ge=0, description="clip the gradient norm to this; 0 = off")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="exponential moving average of the weights; 0 = off")
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    # epochs between validation passes (the last epoch is always validated); the best checkpoint and early
    # stopping consider validated epochs only, and other epochs' history rows have no val_ metrics
    val_every: int = Field(1, ge=1)
    track_train_metric: bool = True  # score a fixed train subset each epoch too (overfitting diagnosis)
    time_limit_minutes: float = Field(
        0.0,
        ge=0,
        description="stop before an epoch that would end past this wall time (the "
        "median of the recent epochs plus a validation pass); "
        "0 = off (size epochs to fit: the schedule spans all of them)",
    )
    # with a time limit: after every epoch, plan the epochs (at most `epochs`) that end within 97% of it and re-span
    # the learning-rate schedule over them, continuously, so training ends annealed instead of cut mid-schedule
    # (tasks/training/budget.py; times differ between runs: so may results)
    fit_epochs_to_time_limit: bool = True


class ModelConfig(Strict):
    name: str = "small_cnn"
    # none | path to a local checkpoint | torchvision:<WeightsEnum member>, e.g. torchvision:DEFAULT | imagenet: the
    # ImageNet weights of the model's pretrained network (its encoder), found offline (cv_models/weights.py
    # resolve_imagenet), with the input normalisation those weights expect instead of `normalization`
    weights: str = "none"
    weights_file: str = ""  # weights: imagenet: a local file of those ImageNet weights, tried before any cache
    # fine-tuning from weights: imagenet: the pretrained encoder frozen (its BatchNorm in eval mode) for the first N
    # epochs, then trained; and its learning rate as a fraction of optimizer.lr (the new layers get optimizer.lr)
    freeze_encoder_epochs: int = Field(0, ge=0)
    encoder_lr_factor: float = Field(1.0, gt=0, le=1)
    freeze_backbone: bool = False  # train the head only
    frozen_layers: list[str] = []  # or freeze these layers by name prefix, e.g. [conv1, bn1, layer1]
    width: int = Field(32, ge=1, le=1024)
    depth: int = Field(3, ge=1, le=8)
    dropout: float = Field(0.0, ge=0, lt=1)
    options: NoOptions = NoOptions()  # each task declares its own (task_settings)


class OverfitCheckConfig(Strict):
    """Train on one batch: healthy code drives the loss down relative to where it started. An absolute
    threshold does not transfer between datasets (a many-object detection loss starts and ends higher)."""

    enabled: bool = True
    batch_size: int = Field(8, ge=1)
    steps: int = Field(60, ge=1, description="step cap; the check stops early once it passes")
    lr: float = Field(3e-3, gt=0)
    max_loss_ratio: float = Field(
        0.35, gt=0, lt=1, description="pass when the loss falls below this fraction of its first value"
    )
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
    def _range(self) -> Self:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        return self


class RescaleAug(Switch):
    scale: tuple[float, float] = (0.8, 1.2)

    @model_validator(mode="after")
    def _range(self) -> Self:
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
    scale: tuple[float, float] = (
        0.02,
        0.2,
    )  # erased area as a fraction of the image; aspect ratio log-uniform in 0.3-3.3


class MixAug(Switch):
    alpha: float = Field(1.0, gt=0)


class AugmentConfig(Strict):
    """Each augmentation is switchable, with its strength; the baseline stage ignores all of them.

    Every field holding a :class:`Switch` is an augmentation: a task adds its own (detection's mosaic) as
    another Switch field of its subclass, and registers how to apply it (``CVTask.augmentations``).
    """

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
    options: NoOptions = NoOptions()  # task-specific settings shared by its augmentations (min_visible, ...)

    @classmethod
    def switch_names(cls) -> list[str]:
        """Every augmentation this schema declares (its Switch fields), in order."""
        return [name for name, f in cls.model_fields.items() if _holds_switch(f.annotation)]

    def enabled_names(self) -> list[str]:
        return [name for name in self.switch_names() if getattr(self, name).enabled]

    def all_off(self) -> dict[str, bool]:
        """Dotted overrides (relative to ``augment``) switching every augmentation off."""
        return {f"{name}.enabled": False for name in self.switch_names()}


# ---------------------------------------------------------------- data


# the dataset formats there is a reader for; which task reads which: cv_models/data/registry.py
DataFormat = Literal["imagefolder", "mask_folder", "coco", "voc", "yolo", "instance_folders"]


class DataConfig(Strict):
    format: DataFormat = "imagefolder"
    path: str
    classes: list[str] | None = None  # declared class set; None = read from the data
    split_from: Literal["folders", "seed"] = "folders"
    split_seed: int = 0
    split_fractions: dict[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}
    color_mode: Literal["convert", "reject"] = "convert"  # grayscale / RGBA / palette images
    min_size: int = Field(8, ge=1)
    max_size: int = Field(8192, ge=1)
    # a symlink inside the dataset whose target lies outside data.path: followed and listed in the validation
    # notes (true), or refused by validation (false); '..' and absolute file names are always refused
    follow_symlinks: bool = True
    # decoded images resized to the training size, kept once (cv_models/data/cache.py): the augmentations run on the
    # kept copy, so results equal cache none's; ram: in memory | disk: .cache/ of the project, reused by later runs
    cache: Literal["none", "ram", "disk"] = "none"
    cache_max_gb: float = Field(
        4.0, gt=0, description="refuse a data.cache larger than this (estimated before filling)"
    )
    options: NoOptions = NoOptions()  # task-specific reader options (each task declares its own)

    @model_validator(mode="after")
    def _check(self) -> Self:
        fr = self.split_fractions
        if set(fr) != {"train", "val", "test"} or any(v <= 0 for v in fr.values()) or abs(sum(fr.values()) - 1) > 1e-6:
            raise ValueError(f"split_fractions needs positive train, val and test summing to 1, got {fr}")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} is above max_size {self.max_size}")
        return self


# the training size: one number (square) or [height, width] (keeps a non-square dataset's aspect ratio)
ImageSize = (
    Annotated[int, Field(ge=8, le=4096)]
    | tuple[Annotated[int, Field(ge=8, le=4096)], Annotated[int, Field(ge=8, le=4096)]]
)


def size_hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``image_size`` as ``(height, width)``, from either of its forms."""
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


class TaskConfig(Strict):
    """Settings of one CV task (``tasks.<name>`` in params.yaml)."""

    data: DataConfig
    image_size: ImageSize = 64
    normalization: Literal["none", "mean_image", "per_channel_mean", "per_channel_std"] = "per_channel_std"
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    overfit_check: OverfitCheckConfig = OverfitCheckConfig()
    augment: AugmentConfig = AugmentConfig()
    preview_samples: int = Field(16, ge=1, le=256)
    options: NoOptions = NoOptions()  # task-specific (report pictures, ...)

    @property
    def image_hw(self) -> tuple[int, int]:
        """The training size as ``(height, width)`` (``image_size`` may be one number or [h, w])."""
        return size_hw(self.image_size)

    def without_augmentation(self) -> "TaskConfig":
        """These settings with every augmentation switched off (their strengths kept): the baseline's."""
        a = self.augment
        off = {n: getattr(a, n).model_copy(update={"enabled": False}) for n in a.switch_names()}
        return self.model_copy(update={"augment": a.model_copy(update=off)})


# ---------------------------------------------------------------- a task's own schema


def task_settings(
    prefix: str,
    *,
    data_options: type[BaseModel] = NoOptions,
    model_options: type[BaseModel] = NoOptions,
    augment: type[AugmentConfig] = AugmentConfig,
    options: type[BaseModel] = NoOptions,
    data: type[DataConfig] = DataConfig,
) -> type[TaskConfig]:
    """The :class:`TaskConfig` of one task: the shared sections with the task's own options classes in them."""
    data_cls = create_model(f"{prefix}DataConfig", __base__=data, options=(data_options, data_options()))
    model_cls = create_model(f"{prefix}ModelConfig", __base__=ModelConfig, options=(model_options, model_options()))
    return create_model(
        f"{prefix}TaskConfig",
        __base__=TaskConfig,
        data=(data_cls, ...),
        model=(model_cls, model_cls()),
        augment=(augment, augment()),
        options=(options, options()),
    )


def validate_task(settings: type[TaskConfig], raw: Any, name: str) -> TaskConfig:
    """``tasks.<name>`` checked against the task's schema; a :class:`ConfigError` naming the dotted key otherwise."""
    try:
        return settings.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe(err, settings, prefix=f"tasks.{name}.")) from None


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_diff(a: BaseModel, b: BaseModel, ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """The effective settings that differ between two configs: dotted key -> (value in a, value in b)."""
    fa, fb = flat(a.model_dump(mode="json")), flat(b.model_dump(mode="json"))
    return {
        k: (fa.get(k), fb.get(k))
        for k in sorted(set(fa) | set(fb))
        if fa.get(k) != fb.get(k) and not k.startswith(ignore)
    }


def diff_markdown(diff: dict[str, tuple[Any, Any]], left: str, right: str) -> str:
    """A markdown table of :func:`settings_diff`."""
    if not diff:
        return "No setting differs.\n"
    lines = [f"| setting | {left} | {right} |", "|---|---|---|"]
    lines += [f"| `{k}` | {a!r} | {b!r} |" for k, (a, b) in diff.items()]
    return "\n".join(lines) + "\n"


def diff_text(diff: dict[str, tuple[Any, Any]]) -> str:
    """``key: a -> b; ...`` (one line, for a table cell)."""
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()) or "(none)"


# ---------------------------------------------------------------- messages naming the key


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (through ``X | None`` and the like), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _holds_switch(annotation: Any) -> bool:
    model = _model_in(annotation)
    return model is not None and issubclass(model, Switch)


def known_keys(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """The keys the section at ``loc`` (a path below ``model``) accepts; empty where that is not a model."""
    cls = model
    for part in loc:
        if cls is None or not isinstance(part, str) or part not in cls.model_fields:
            return []
        cls = _model_in(cls.model_fields[part].annotation)
    return list(cls.model_fields) if cls is not None else []


def did_you_mean(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


HEADER = "invalid value in params.yaml:"


def describe(err: ValidationError, model: type[BaseModel] | None = None, prefix: str = "") -> str:
    """One line per problem, each naming its full dotted key; unknown keys get the closest known one. A section a
    validator checked against a schema of its own (``tasks.<name>``) raised a :class:`ConfigError` already worded
    so: its lines are kept."""
    lines = []
    for e in err.errors():
        own = e.get("ctx", {}).get("error")
        if isinstance(own, ConfigError):
            lines += [line if line.startswith(" ") else "  " + line for line in str(own).splitlines() if line != HEADER]
            continue
        loc = tuple(
            p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in ("float", "int", "str", "bool")))
        )
        key = prefix + ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            known = known_keys(model, loc[:-1])
            hint = did_you_mean(str(loc[-1]), known) if known else ""
            choices = f" (known keys here: {', '.join(known)})" if known and not hint else ""
            lines.append(f"  {key}: unknown key{hint}{choices}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return HEADER + "\n" + "\n".join(lines)
