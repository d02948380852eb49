"""The instance segmentation evaluation report: COCO ground truth and results JSON at the images' own
resolution, how to rescore them with pycocotools, and pictures of predicted masks on test images."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cv_models.base import EvalResult
from cv_models.data.coco import RESCORE_LINES
from cv_models.data.probe import load_rgb

PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (145, 30, 180),
    (245, 130, 48),
    (70, 240, 240),
    (240, 50, 230),
]

RECOMPUTE = (
    "# Rescoring the test results\n\n`coco_ground_truth.json` (each test image's id, file_name and original "
    "width/height; masks as RLE) and `coco_results_<model>.json` (COCO results: boxes x, y, w, h in the original "
    "pixels, masks as compressed RLE) are at each image's own resolution. With pycocotools:\n\n```python\n"
    "from collections import Counter\n\nimport numpy as np\nfrom pycocotools.coco import COCO\nfrom pycocotools.cocoeval import COCOeval\n\n"
    "gt = COCO('coco_ground_truth.json')\ndt = gt.loadRes('coco_results_augmented.json')\n"
    "for iou_type in ('segm', 'bbox'):  # metrics.json: mask_map50 / mask_map, box_map50 / box_map\n"
    "    e = COCOeval(gt, dt, iou_type)\n"
    "    # as the pipeline: maxDets never below the busiest image (COCO's 100 would drop detections)\n"
    "    busiest = max((Counter(a['image_id'] for a in gt.dataset['annotations']) | "
    "Counter(r['image_id'] for r in dt.dataset['annotations'])).values())\n"
    "    e.params.maxDets = [1, 10, 100] + ([busiest] if busiest > 100 else [])  # metrics.json: max_dets\n"
    "    e.evaluate(); e.accumulate()\n    prefix = {'segm': 'mask_', 'bbox': 'box_'}[iou_type]\n    "
    + RESCORE_LINES.replace("\n", "\n    ").rstrip(" ")
    + "```\n"
)


def draw(
    image: torch.Tensor,
    target,
    class_names: Callable[[], list[str]],
    score_threshold: float = 0.5,
    min_size: int = 192,
) -> torch.Tensor:
    """Masks filled in per-class colours, boxes and class names; predictions below the score threshold
    hidden; small images enlarged (nearest) to ``min_size`` so the names stay legible. ``class_names`` is
    called only when there is an instance to name."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from cv_models.visualise import to_uint8

    picture = to_uint8(image)
    masks, labels, boxes = target["masks"], target["labels"], target["boxes"]
    if masks.ndim == 4:  # model output: N x 1 x H x W probabilities
        masks = masks[:, 0] > 0.5
    keep = target["scores"] >= score_threshold if "scores" in target else torch.ones(len(labels), dtype=torch.bool)
    masks, labels, boxes = masks[keep].bool().cpu(), labels[keep].cpu(), boxes[keep].cpu().float()
    factor = -(-min_size // picture.shape[-1])  # ceil
    if factor > 1:
        picture = picture.repeat_interleave(factor, -1).repeat_interleave(factor, -2)
        masks = masks.repeat_interleave(factor, -1).repeat_interleave(factor, -2)
        boxes = boxes * factor
    if len(labels) == 0:
        return picture
    names = class_names()
    colours = [PALETTE[(int(k) - 1) % len(PALETTE)] for k in labels]
    picture = draw_segmentation_masks(picture, masks, alpha=0.45, colors=colours)
    text = [names[int(k) - 1] if 0 < int(k) <= len(names) else str(int(k)) for k in labels]
    if "scores" in target:
        text = [f"{t} {s:.2f}" for t, s in zip(text, target["scores"][keep].tolist())]
    return draw_bounding_boxes(picture, boxes, labels=text, colors=colours, width=1)


def coco_target(results: list[dict], image_id: int, size) -> dict:
    """COCO results (or ground-truth annotations: no scores) of one image back to a drawable target (masks decoded from RLE)."""
    from pycocotools import mask as mask_utils

    mine = [r for r in results if r["image_id"] == image_id]
    h, w = size
    masks = [
        mask_utils.decode({"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()})
        for r in mine
    ]
    target = {
        "masks": torch.from_numpy(np.stack(masks)).bool() if masks else torch.zeros((0, h, w), dtype=torch.bool),
        "boxes": torch.tensor(
            [[x, y, x + bw, y + bh] for x, y, bw, bh in (r["bbox"] for r in mine)], dtype=torch.float32
        ).reshape(-1, 4),
        "labels": torch.tensor([r["category_id"] for r in mine], dtype=torch.int64),
    }
    if all("score" in r for r in mine) and mine:
        target["scores"] = torch.tensor([r["score"] for r in mine], dtype=torch.float32)
    return target


def write_coco_files(results: dict[str, EvalResult], out_dir: Path) -> list[Path]:
    """The ground truth and each model's results as COCO JSON, and RECOMPUTE.md: how to rescore them."""
    files = []
    gt = next(iter(results.values())).extra["coco_gt"]
    files.append(out_dir / "coco_ground_truth.json")
    files[-1].write_text(json.dumps(gt))
    for name, res in results.items():
        path = out_dir / f"coco_results_{name}.json"
        path.write_text(json.dumps(res.predictions))
        files.append(path)
    files.append(out_dir / "RECOMPUTE.md")
    files[-1].write_text(RECOMPUTE)
    return files


def draw_test_images(
    results: dict[str, EvalResult], records: list[dict], out_dir: Path, draw_one: Callable[..., torch.Tensor]
) -> Path:
    """The ground truth and each model's predictions drawn on ``records``' images at their own size, as scored."""
    from cv_models.visualise import caption, save_grid

    gt = next(iter(results.values())).extra["coco_gt"]
    pictures = []
    for r in records:
        shown = torch.from_numpy(np.asarray(load_rgb(r["path"])).copy()).permute(2, 0, 1).float() / 255
        size = shown.shape[-2:]
        pictures.append(
            caption(
                draw_one(shown, coco_target(gt["annotations"], int(r["image_id"]), size)).float() / 255, "ground truth"
            )
        )
        for name, res in results.items():
            pred = coco_target(res.predictions, int(r["image_id"]), size)
            pictures.append(caption(draw_one(shown, pred).float() / 255, name))
    return save_grid(pictures, out_dir / "predictions_test.png", nrow=1 + len(results))


def write_report(
    results: dict[str, EvalResult], test, out_dir: Path, report_images: int, draw_one: Callable[..., torch.Tensor]
) -> list[Path]:
    """COCO ground truth (file names, original sizes) and results JSON (RLE masks) per model, at the images'
    own resolution, how to rescore them, and predicted masks drawn on the first ``report_images`` test images."""
    files = write_coco_files(results, out_dir)
    n = min(report_images, len(test))
    if n == 0:
        return files
    return [*files, draw_test_images(results, test.records[:n], out_dir, draw_one)]
