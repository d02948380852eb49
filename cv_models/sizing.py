"""Detector settings sized from the data (``auto``, the default): a detector that returns fewer boxes
per image than the data holds objects, or keeps fewer proposals than that, caps its own recall; the
fixed numbers that suit four synthetic shapes do not suit 40 COCO objects or 260 nuclei per image.

Each ``auto`` key of ``model.options`` is replaced from the largest number of objects in one training
image (``most``); the validation report states the values used.
"""

from __future__ import annotations

import math
from typing import TypeVar

from pydantic import BaseModel

Options = TypeVar("Options", bound=BaseModel)  # a task's model.options: DetectionModelOptions, InstanceModelOptions

AUTO_KEYS = (
    "detections_per_img",
    "rpn_post_nms_top_n_test",
    "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_train",
    "rpn_pre_nms_top_n_train",
)


def _tens(x: float) -> int:
    return int(math.ceil(x / 10) * 10)


def sized_values(most: int) -> dict[str, int]:
    """The data-sized value of each key (small floors keep tiny data at the former CPU-friendly sizes)."""
    detections = max(20, _tens(2 * most))  # twice the busiest image: room for near-duplicates before NMS
    post_test = max(75, 2 * detections)  # proposals per image kept for the box head at test time
    post_train = max(150, _tens(4 * most))  # enough proposals to cover every object during training
    return {
        "detections_per_img": detections,
        "rpn_post_nms_top_n_test": post_test,
        "rpn_pre_nms_top_n_test": 2 * post_test,
        "rpn_post_nms_top_n_train": post_train,
        "rpn_pre_nms_top_n_train": 2 * post_train,
    }


def sized_options(options: Options, most: int) -> tuple[Options, dict[str, int]]:
    """A copy of ``options`` (the same class) with every ``auto`` key replaced; and the replaced keys with their
    values."""
    values = sized_values(most)
    chosen = {k: values[k] for k in AUTO_KEYS if getattr(options, k) == "auto"}
    return options.model_copy(update=chosen), chosen


def describe(most: int, options: BaseModel) -> str:
    """The validation report's lines: what the data says and what each setting becomes."""
    _, chosen = sized_options(options, most)
    lines = [
        f"Largest number of objects in one training image: {most}.",
        "",
        "| setting | value | from |",
        "|---|---|---|",
    ]
    for k in AUTO_KEYS:
        v = getattr(options, k)
        lines.append(
            f"| model.options.{k} | {chosen.get(k, v)} | {'auto (sized from the data)' if k in chosen else 'params.yaml'} |"
        )
    det = chosen.get("detections_per_img", getattr(options, "detections_per_img"))
    lines.append(
        "| COCO maxDets (scoring) | max(100, objects or detections in the busiest scored image) | every reported "
        "AP is taken at it; metrics.json states it (max_dets) beside AP@.5 at maxDets 100 (map50_maxdets100) |"
    )
    if isinstance(det, int) and det < most:
        lines.append(
            f"\n**Warning:** model.options.detections_per_img={det} is below the {most} objects of the busiest "
            f"training image: recall is capped there. Set it to auto."
        )
    return "\n".join(lines)
