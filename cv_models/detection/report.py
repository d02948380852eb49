"""The evaluation report's files and pictures: COCO ground truth and results JSON per model in each image's original
pixels, how to rescore them with pycocotools (RECOMPUTE.md), and boxes drawn on images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torchvision.transforms import v2

from cv_models.base import EvalResult
from cv_models.data.coco import RESCORE_LINES
from cv_models.data.probe import load_rgb

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]

RECOMPUTE = (
    "# Rescoring the test results\n\n`ground_truth_test.json` (each test image's id, file_name, original "
    "width/height and source_id, its id in the dataset's own annotations) and `predictions_<model>.json` (COCO results: boxes x, y, w, h in the original pixels) "
    "are at each image's own resolution. With pycocotools:\n\n```python\n"
    "from collections import Counter\n\nimport numpy as np\nfrom pycocotools.coco import COCO\nfrom pycocotools.cocoeval import COCOeval\n\n"
    "gt = COCO('ground_truth_test.json')\ndt = gt.loadRes('predictions_augmented.json')\n"
    "e = COCOeval(gt, dt, 'bbox')\n"
    "# as the pipeline: maxDets never below the busiest image (COCO's 100 would drop detections)\n"
    "busiest = max((Counter(a['image_id'] for a in gt.dataset['annotations']) | "
    "Counter(r['image_id'] for r in dt.dataset['annotations'])).values())\n"
    "e.params.maxDets = [1, 10, 100] + ([busiest] if busiest > 100 else [])  # metrics.json: max_dets\n"
    "e.evaluate(); e.accumulate()\nprefix = ''  # metrics.json: map, map50, ...\n" + RESCORE_LINES + "```\n"
)


def draw_boxes(image, target, class_names: list[str], min_size: int = 192, score_threshold: float = 0.0):
    """Boxes with class names (and mixing weight or score below 1) on the image, upscaled for legibility."""
    from torchvision.utils import draw_bounding_boxes

    from cv_models.visualise import to_uint8

    names = ["background"] + class_names
    pic = to_uint8(image)
    boxes = target["boxes"].detach().cpu().float().reshape(-1, 4)
    scale = max(1.0, min_size / max(pic.shape[-2:]))
    if scale > 1:
        pic = torch.nn.functional.interpolate(pic[None].float(), scale_factor=scale, mode="nearest")[0].to(torch.uint8)
        boxes = boxes * scale
    score = target.get("scores", target.get("weights"))
    keep = torch.ones(len(boxes), dtype=torch.bool) if score is None else score.cpu() >= score_threshold
    labels = []
    for k, lab in enumerate(target["labels"].tolist()):
        text = names[lab] if 0 <= lab < len(names) else str(lab)
        if score is not None and float(score[k]) < 0.995:
            text += f" {float(score[k]):.2f}"
        labels.append(text)
    labels = [lab for lab, k in zip(labels, keep.tolist()) if k]
    colors = [PALETTE[(lab - 1) % len(PALETTE)] for lab, k in zip(target["labels"].tolist(), keep.tolist()) if k]
    if not keep.any():
        return pic
    return draw_bounding_boxes(pic, boxes[keep], labels=labels, colors=colors, width=2)


def _pictures(records: list[dict], predictions: list[dict], draw: Callable, threshold: float) -> list[torch.Tensor]:
    """Each record's image with the predictions of it drawn (COCO x, y, w, h boxes back to corners)."""
    pictures = []
    for rec in records:
        image = v2.functional.to_image(load_rgb(rec["path"])).float() / 255
        preds = [p for p in predictions if p["image_id"] == rec["image_id"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (p["bbox"] for p in preds)]).reshape(-1, 4)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([p["category_id"] for p in preds], dtype=torch.int64),
            "scores": torch.tensor([p["score"] for p in preds]),
        }
        pictures.append(draw(image, target, score_threshold=threshold))
    return pictures


def write_report(
    results: dict[str, EvalResult], test, out_dir: Path, draw: Callable, n_images: int, threshold: float
) -> list[Path]:
    """COCO ground truth (file names, original sizes) and COCO results JSON per model in the original pixels
    (recompute with pycocotools: RECOMPUTE.md), the first ``n_images`` test images with each model's boxes drawn."""
    from cv_models.visualise import save_grid

    files = [out_dir / "ground_truth_test.json"]
    gt = test.coco_ground_truth()
    files[0].write_text(json.dumps(gt))
    n = min(n_images, len(test))
    for model_name, res in results.items():
        path = out_dir / f"predictions_{model_name}.json"
        path.write_text(json.dumps(res.predictions))
        files.append(path)
        if model_name == "dummy" or n == 0:
            continue
        pictures = _pictures(test.records[:n], res.predictions, draw, threshold)
        files.append(save_grid(pictures, out_dir / f"predictions_{model_name}.png", nrow=4))
    (out_dir / "RECOMPUTE.md").write_text(RECOMPUTE)
    return files
