"""The rules ``python -m tasks init`` proposes settings by: tables per task and per kind of data, and one small
function per setting. Each rule returns :class:`Choice` rows (a dotted key under ``tasks.<task>``, the value,
and why), so the printed table explains every value written.

The model of each task is chosen in one place: :data:`PRETRAINED` where ImageNet weights resolve offline on this
machine (:func:`cv_models.weights.resolve_imagenet`) and docs/transfer-learning.md's figures show they help, else
:data:`MODELS` (from scratch), with the reason in the table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cv_models.data.measure import DataFacts
from cv_models.sizing import AUTO_KEYS
from cv_models.weights import WeightsError, resolve_imagenet

KINDS = ("photos", "street", "microscopy", "documents")


@dataclass(frozen=True)
class Profile:
    """What one task costs and wants on a CPU core (figures from NOTES and the real-data overlays)."""

    pixels_per_s: float  # training throughput, one torch thread, at the proposed model
    epochs_wanted: int  # the image size is lowered until about this many epochs fit the budget
    min_side: int
    max_side: int
    batch_size: int
    size_step: int  # image sides are multiples of this (the networks' total stride)
    balance: dict  # settings that counter class imbalance (empty: the task has none)


# throughputs calibrated on the README's real-data rows (2-core AMD EPYC under load, one torch thread, validation
# included): trashnet150 113k px/s, isbi_membrane 92k, bccd ~50k, coco128_lightly 78k, coco128_json 84k
PROFILES = {
    "classification": Profile(115_000, 3, 32, 160, 32, 16, {"train.loss.class_weights": "inverse_frequency"}),
    "segmentation": Profile(90_000, 12, 64, 256, 4, 32, {"train.loss.name": "ce_dice"}),
    "detection": Profile(60_000, 12, 192, 384, 4, 32, {}),
    "instance_segmentation": Profile(80_000, 12, 192, 320, 4, 32, {}),
}

# the model of each task (and of a kind of data, where it differs): the one table to point at pretrained weights
MODELS: dict[tuple[str, str | None], dict[str, Any]] = {
    ("classification", None): {
        "model.name": "resnet18",
        "model.weights": "none",
        "model.freeze_encoder_epochs": 0,
        "model.encoder_lr_factor": 1.0,
    },
    ("segmentation", None): {"model.name": "unet", "model.width": 16, "model.depth": 4, "model.weights": "none"},
    ("segmentation", "street"): {
        "model.name": "lraspp_mobilenet_v3_large",
        "model.weights": "none",
        "model.options": {"weights_backbone": None},
    },
    ("detection", None): {
        "model.name": "fasterrcnn",
        "model.weights": "none",
        "model.options.backbone": "resnet18",
        "model.options.backbone_weights": "none",
    },
    ("instance_segmentation", None): {
        "model.name": "maskrcnn",
        "model.weights": "none",
        "model.options.backbone": "resnet18",
        "model.options.backbone_weights": "none",
    },
}


@dataclass(frozen=True)
class Pretrained:
    """A model started from ImageNet weights: proposed when its weights resolve offline and the data is of a kind
    it was measured on. Its settings are those of its real-data overlay (benchmarks/real_data/*_pretrained.yaml)."""

    network: str  # the pretrained network, as resolve_imagenet names it
    kinds: tuple[str, ...]  # the kinds of data the figures were measured on
    profile: Profile  # its throughput and sizes, in place of the task's
    evidence: str
    settings: dict[str, tuple[Any, str]]  # dotted key -> (value, why)


def _fpn_trunk(detector: str, label: str) -> dict[str, tuple[Any, str]]:
    """The box tasks' pretrained settings: ``detector`` on an FPN over the ImageNet EfficientNet-Lite0 trunk."""
    return {
        "model.name": (detector, ""),
        "model.weights": ("imagenet", ""),
        "model.options.backbone": ("timm:efficientnet_lite0", f"{label} on an FPN over the pretrained trunk"),
        "model.options.backbone_weights": ("none", "model.weights loads the trunk"),
        "model.encoder_lr_factor": (0.5, "the pretrained trunk at half the new FPN's and heads' rate"),
    }


# throughput from docs/transfer-learning.md row 1 (trashnet150, 1771 training images at 128 px: 116 s an unfrozen
# epoch, 2-core EPYC under load): ~250k px/s; 2 epochs wanted gives the overlay's 128 px at 4 min
PRETRAINED: dict[str, Pretrained] = {
    "classification": Pretrained(
        "timm:efficientnet_lite0",
        ("photos", "street"),
        Profile(250_000, 2, 96, 224, 32, 32, {"train.loss.class_weights": "inverse_frequency"}),
        "trashnet150 test accuracy in 4 min: 0.794 from ImageNet vs 0.585 from scratch (resnet18) and 0.479 for the "
        "same network from random weights (docs/transfer-learning.md rows 1, 5, 4)",
        {
            "model.name": ("timm:efficientnet_lite0", ""),
            "model.weights": ("imagenet", ""),
            "model.freeze_encoder_epochs": (1, "the new head first learns on frozen ImageNet features (a fast epoch)"),
            "model.encoder_lr_factor": (0.3, "then the encoder fine-tunes at 0.3 of the head's rate"),
            "train.optimizer.lr": (0.003, "the new head's rate (trashnet150_pretrained.yaml)"),
            "train.scheduler.name": (
                "cosine",
                "from the full rate: one-cycle's ramp would spend the frozen epoch at 1/25",
            ),
            "train.loss.label_smoothing": (0.1, "as measured (trashnet150_pretrained.yaml)"),
        },
    ),
    # throughput from docs/transfer-learning.md row 17 (coco128_lightly, 179 training images at 288x384: 30 epochs
    # in 1162 s on a free 2-core EPYC, ~510k px/s), a quarter of it kept: the figure init's coco128_lightly row
    # was measured with (192x256 at 10 min, docs/init.md)
    "detection": Pretrained(
        "timm:efficientnet_lite0",
        ("photos", "street"),
        Profile(130_000, 12, 192, 384, 8, 32, {}),
        "coco128_lightly person box AP@.5: 0.251 in 20 min from ImageNet (docs/transfer-learning.md row 17), and this "
        "proposal 0.193 in 10, against 0.061 in 10 from scratch with crops pretraining (docs/init.md)",
        _fpn_trunk("fasterrcnn", "Faster R-CNN"),
    ),
    # throughput from coco128_json (90 training images at 288x384: 84 epochs in 1743 s on a free 2-core EPYC,
    # ~480k px/s, docs/transfer-learning.md row 20), halved for a loaded CPU
    "instance_segmentation": Pretrained(
        "timm:efficientnet_lite0",
        ("photos", "street"),
        Profile(250_000, 12, 192, 384, 4, 32, {}),
        "coco128_json person mask AP@.5: 0.160 in 30 min from ImageNet at lr 0.0005 (docs/transfer-learning.md row 20), "
        "and this proposal 0.103 in 10, against 0.004 in 10 from scratch with crops pretraining (docs/init.md)",
        {
            **_fpn_trunk("maskrcnn", "Mask R-CNN"),
            "train.optimizer.lr": (
                0.0005,
                "params.yaml's 0.003 is for training from scratch: on coco128_json it wrecked the pretrained trunk "
                "(val mask AP@.5 0.017 at best in 65 epochs, 0.11 after 23 at 0.0005)",
            ),
        },
    ),
}
# why a task (or a kind of data) starts from scratch although its pretrained network resolves
# (docs/transfer-learning.md)
SCRATCH_WHY = {
    "segmentation": "from scratch: timm_unet on ImageNet EfficientNet-Lite0 gave no gain on isbi_membrane (test mIoU "
    "0.784 vs 0.788 from scratch in 4 min, docs/transfer-learning.md row 13 and docs/init.md); not measured on photos",
    "detection": "from scratch: Faster R-CNN on ImageNet EfficientNet-Lite0 scored below it on bccd's blood smears "
    "(mAP@.5 0.847 vs 0.879 from scratch in 6 min, docs/transfer-learning.md row 11, docs/init.md)",
    "instance_segmentation": "from scratch: Mask R-CNN from ImageNet was measured on photos only (coco128_json)",
}

# augmentation preset per kind of data: flips only where they keep the labels true
PRESETS: dict[str, dict[str, bool]] = {
    "photos": {"hflip": True, "vflip": False, "rotation": False, "color": True},
    "street": {"hflip": True, "vflip": False, "rotation": False, "color": True},
    "microscopy": {"hflip": True, "vflip": True, "rotation": False, "color": False},
    "documents": {"hflip": False, "vflip": False, "rotation": False, "color": True},
}
PRESET_WHY = {
    "photos": "photos have an up: left-right flips and colour, no vertical flips or rotations",
    "street": "street scenes have an up and a road below: left-right flips only, no vertical flips",
    "microscopy": "slides have no up: flips both ways; no colour change (stains carry meaning)",
    "documents": "text reads one way: no flips or rotations",
}
VAL_PASSES = 8  # validation passes wanted over the epochs that fit, at most...
VAL_SHARE = 0.05  # ...and at most this share of the budget spent validating
# a validation image costs about half a training image (a forward pass only): trashnet150 from ImageNet, 5.5 s a
# pass over 378 images against 49 s an epoch over 1765 (2-core EPYC, docs/init.md)
VAL_IMAGE_COST = 0.5
# train.epochs is only the cap the time limit plans within: the estimate above comes from a loaded CPU, and a free
# one fits two to five times as many (isbi_membrane: 63 epochs in 4 min against about 12 estimated), so the cap
# leaves room for ten times the estimate and the time limit decides
EPOCHS_HEADROOM, EPOCHS_MIN, EPOCHS_MAX = 10, 20, 300
MIN_OBJECTS = 100  # training objects a class needs to be learnt from scratch in a CPU budget (README real-data rows)
IMBALANCED = 5.0  # most / least frequent class at or above this: the loss counters it
MIXING = ("mixup", "cutmix", "mosaic", "copy_paste")  # pay off over long schedules only


@dataclass
class Choice:
    key: str  # dotted, under tasks.<task>
    value: Any
    why: str


@dataclass
class Context:
    task: str
    facts: DataFacts
    budget_minutes: float
    kind: str
    kind_why: str
    schema: dict  # the task's section as its defaults: which keys exist
    size: tuple[int, int] = (0, 0)
    epochs: float = 0.0  # estimated to fit the budget
    extra: dict = field(default_factory=dict)
    model: list[Choice] = field(default_factory=list)  # the model's settings (pick_model)
    model_profile: Profile | None = None  # the pretrained model's, when it is proposed

    @property
    def profile(self) -> Profile:
        return self.model_profile or PROFILES[self.task]

    def has(self, dotted: str) -> bool:
        node = self.schema
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True


def model_for(task: str, kind: str) -> dict[str, Any]:
    return MODELS.get((task, kind)) or MODELS[(task, None)]


def _round(x: float, step: int = 32) -> int:
    return max(step, round(x / step) * step)


def size_rule(c: Context) -> list[Choice]:
    f, p = c.facts, c.profile
    n_train = max(1, f.splits.get("train", 0))
    budget_px = p.pixels_per_s * c.budget_minutes * 60 * 0.8 / (n_train * p.epochs_wanted)
    short = math.sqrt(budget_px / max(f.aspect, 1e-3)) if f.aspect >= 1 else math.sqrt(budget_px * f.aspect)
    why = f"{p.epochs_wanted} epochs of {n_train} training images in {c.budget_minutes:g} min"
    image_short = min(f.width, f.height) or short
    cap = min(p.max_side * min(f.aspect, 1 / f.aspect), image_short)
    if f.box_side > 0 and short < 12 / f.box_side <= cap:  # small objects stay a few pixels wide, where the cap allows
        short, why = (
            12 / f.box_side,
            f"keeps the smallest 10% of boxes at 12 px or more ({f.box_side:.1%} of the image)",
        )
    if short < p.min_side:
        why = f"the {c.task} floor of {p.min_side} px (fewer pixels lose the objects)"
    short = min(max(short, p.min_side), cap)
    h, w = (short, short * f.aspect) if f.aspect >= 1 else (short / f.aspect, short)
    c.size = (_round(h, p.size_step), _round(w, p.size_step))
    c.epochs = p.pixels_per_s * c.budget_minutes * 60 * 0.8 / (n_train * c.size[0] * c.size[1])
    value = c.size[0] if c.size[0] == c.size[1] else list(c.size)
    return [
        Choice(
            "image_size",
            value,
            f"median aspect {f.aspect:.2f} kept; {why} (capped at {p.max_side} px, and at "
            f"the images' own {image_short:.0f} px)",
        )
    ]


def _why_not_pretrained(c: Context, p: Pretrained | None) -> tuple[str, str]:
    """("", place) when ``p``'s weights resolve on this machine for this kind of data; else (why not, "")."""
    if p is None:
        return SCRATCH_WHY.get(c.task, "from scratch: no pretrained model measured for this task"), ""
    if c.kind not in p.kinds:
        measured = f"{p.network} from ImageNet is proposed for {' and '.join(p.kinds)}, not {c.kind}"
        return f"{SCRATCH_WHY[c.task]}; {measured}" if c.task in SCRATCH_WHY else f"from scratch: {measured}", ""
    try:
        found = resolve_imagenet(p.network)
    except (WeightsError, ImportError) as err:
        first = str(err).splitlines()[0].split("; tried")[0]
        return (
            f"from scratch: {first} (docs/transfer-learning.md, 'Where the weights come from', says where to put them)"
        ), ""
    return "", f"{found.place}: {found.path}"


def pick_model(c: Context) -> None:
    """The pretrained model where its weights resolve offline and the figures support it, else the MODELS row;
    sets ``c.model`` (the rows) and ``c.model_profile``."""
    p = PRETRAINED.get(c.task)
    why, place = _why_not_pretrained(c, p)
    if p is not None and not why:
        head = f"ImageNet weights found offline ({place}); {p.evidence}"
        c.model = [Choice(k, v, w or head) for k, (v, w) in p.settings.items()]
        c.model_profile = p.profile
        return
    c.model = [
        Choice(
            k, v, f"the {c.task} model for a {c.budget_minutes:g}-minute CPU budget (tasks/init_rules.py MODELS); {why}"
        )
        for k, v in model_for(c.task, c.kind).items()
    ]


def model_rule(c: Context) -> list[Choice]:
    return [choice for choice in c.model if c.has(choice.key.rsplit(".", 1)[0])]


def epochs_cap(c: Context) -> int:
    return int(min(EPOCHS_MAX, max(EPOCHS_MIN, EPOCHS_HEADROOM * c.epochs)))


def epochs_rule(c: Context) -> list[Choice]:
    epochs = epochs_cap(c)
    return [
        Choice(
            "train.epochs",
            epochs,
            f"an upper bound: about {c.epochs:.0f} fit on a loaded CPU, more on a free one or a GPU; the time limit "
            f"fits them (fit_epochs_to_time_limit re-spans the schedule)",
        ),
        Choice("train.time_limit_minutes", c.budget_minutes, "--budget-minutes: training stops within it"),
        Choice("train.batch_size", c.profile.batch_size, "small batches: more updates on a CPU"),
        Choice("train.track_train_metric", False, "scoring a train subset each epoch costs as much as validating"),
    ]


def val_every_rule(c: Context) -> list[Choice]:
    """Up to VAL_PASSES passes, as many as VAL_SHARE of the budget affords; none affordable: the last epoch only
    (always validated)."""
    f = c.facts
    n_train = max(1, f.splits.get("train", 0))
    n_val = f.splits.get("val") or round(0.15 * f.n_images)
    pass_epochs = VAL_IMAGE_COST * n_val / n_train  # one validation pass, in epochs
    passes = min(VAL_PASSES, int(VAL_SHARE * c.epochs / pass_epochs)) if pass_epochs else VAL_PASSES
    cost = f"a pass over {n_val} validation images costs ~{pass_epochs:.2f} of an epoch"
    if passes < 1:
        why = f"{cost}: more than {VAL_SHARE:.0%} of the ~{c.epochs:.0f} epochs that fit, so the last epoch only"
        return [Choice("train.val_every", epochs_cap(c), why)]
    why = (
        f"{passes} validation passes over the ~{c.epochs:.0f} epochs that fit ({cost}; at most {VAL_PASSES}, "
        f"at most {VAL_SHARE:.0%} of the budget): enough to pick the best epoch"
    )
    return [Choice("train.val_every", max(1, round(c.epochs / passes)), why)]


def augment_rule(c: Context) -> list[Choice]:
    out = [
        Choice(f"augment.{name}.enabled", on, f"{c.kind} preset ({c.kind_why}): {PRESET_WHY[c.kind]}")
        for name, on in PRESETS[c.kind].items()
        if c.has(f"augment.{name}")
    ]
    if c.epochs < 60:
        out += [
            Choice(
                f"augment.{name}.enabled",
                False,
                f"~{c.epochs:.0f} epochs fit: mixing images pays off over longer schedules",
            )
            for name in MIXING
            if c.has(f"augment.{name}")
        ]
    return out


def _available_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def cache_rule(c: Context) -> list[Choice]:
    gb = c.facts.n_images * c.size[0] * c.size[1] * 3 * 1.2 / 2**30
    free = _available_gb()
    if gb < min(4.0, free / 4):
        return [
            Choice(
                "data.cache",
                "ram",
                f"the resized images take ~{gb * 1024:.0f} MB, under a quarter of the "
                f"{free:.1f} GB free: decoded once, not every epoch",
            )
        ]
    return [Choice("data.cache", "none", f"the resized images would take ~{gb:.1f} GB ({free:.1f} GB free)")]


def detector_rule(c: Context) -> list[Choice]:
    keys = [k for k in AUTO_KEYS if c.has(f"model.options.{k}")]
    return [
        Choice(f"model.options.{k}", "auto", f"sized from the busiest training image ({c.facts.most_objects} objects)")
        for k in keys
    ]


def balance_rule(c: Context) -> list[Choice]:
    f = c.facts
    if f.imbalance < IMBALANCED or not c.profile.balance:
        return []
    why = f"classes are imbalanced (most / least frequent = {f.imbalance:.1f})"
    out = []
    for key, value in c.profile.balance.items():
        if value == "inverse_frequency":
            counts = [max(f.class_counts.get(n, 0.0), 1.0) for n in f.classes]
            mean = sum(counts) / len(counts)
            value = [round(mean / n, 3) for n in counts]
            out.append(Choice(key, value, why + ": weights = mean count / class count"))
        else:
            out.append(Choice(key, value, why + ": Dice weighs every class alike"))
    return out


def data_policy_rule(c: Context) -> list[Choice]:
    f, out = c.facts, []
    if f.conflicting_duplicates and c.has("data.options.conflicting_duplicates"):
        out.append(
            Choice(
                "data.options.conflicting_duplicates",
                "drop",
                f"{f.conflicting_duplicates} identical files "
                f"under two classes: left out (named in the validation notes) instead of stopping",
            )
        )
    if f.invalid_boxes and f.invalid_boxes <= 0.01 * f.n_boxes and c.has("data.options.invalid_boxes"):
        out.append(
            Choice(
                "data.options.invalid_boxes",
                "drop",
                f"{f.invalid_boxes} of {f.n_boxes} boxes are invalid: "
                f"left out (listed by validation) instead of stopping",
            )
        )
    return out


def rare_classes_rule(c: Context) -> list[Choice]:
    """Box tasks: classes with too few training objects to learn from random initialisation in a CPU budget
    are left out (their images stay, as background), when some class has enough."""
    f = c.facts
    if not f.n_boxes or not c.has("data.options.keep_classes"):
        return []
    keep = [n for n, k in sorted(f.class_counts.items(), key=lambda t: -t[1]) if k >= MIN_OBJECTS]
    if not keep or len(keep) == len(f.classes):
        return []
    return [
        Choice(
            "data.options.keep_classes",
            keep,
            f"{len(f.classes) - len(keep)} of {len(f.classes)} classes have "
            f"under {MIN_OBJECTS} training objects: too few to learn from random initialisation in minutes "
            f"(remove the key to train on all)",
        )
    ]


# every rule, in the order the table shows them; a new rule is one more function here
RULES: list[Callable[[Context], list[Choice]]] = [
    size_rule,
    model_rule,
    epochs_rule,
    val_every_rule,
    augment_rule,
    cache_rule,
    detector_rule,
    balance_rule,
    data_policy_rule,
    rare_classes_rule,
]


def pick_kind(kind: str | None, facts: DataFacts) -> tuple[str, str]:
    """The kind of data and why: given, or single-channel images as microscopy, else photos (said in the table)."""
    if kind:
        return kind, "--kind"
    if facts.channels == 1:
        return "microscopy", "no --kind; single-channel images"
    return "photos", "no --kind; colour images (pass --kind for street, microscopy or documents)"


def propose(task: str, facts: DataFacts, budget_minutes: float, kind: str | None, schema: dict) -> list[Choice]:
    kind, why = pick_kind(kind, facts)
    ctx = Context(task, facts, budget_minutes, kind, why, schema)
    pick_model(ctx)  # before the size rule: a pretrained model has its own throughput
    return [choice for rule in RULES for choice in rule(ctx)]
