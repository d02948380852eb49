"""COCO scoring of detections: results entries in each image's original pixels, the model's results on a loader,
the dummy's (one centred box per image), and COCO mAP with per-class AP via pycocotools."""

from __future__ import annotations

from collections import Counter

import torch

from cv_models.base import EvalResult
from cv_models.data.coco import coco_map, no_ground_truth_notes
from cv_models.detection.tta import tta_detections


def coco_results(image_id: int, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """COCO results entries, rounded as exported (so the exported file scores exactly the reported mAP)."""
    out = []
    for (x0, y0, x1, y1), s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        out.append(
            {
                "image_id": int(image_id),
                "category_id": int(lab),
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "score": round(float(s), 5),
            }
        )
    return out


def model_results(model, loader, device, tta: str = "none") -> list[dict]:
    """The model's COCO results on every image of ``loader``, each box mapped back to its image's original pixels
    (the boxes scale exactly, so the per-epoch validation costs nothing more for it); ``tta``: the views fused."""
    model.eval()
    dataset = loader.dataset
    results = []
    for images, targets in loader:
        outputs = tta_detections(model, [im.to(device) for im in images], tta)
        for out, t, im in zip(outputs, targets, images):
            rec = dataset.by_id[t["image_id"]]
            sx, sy = rec["width"] / im.shape[-1], rec["height"] / im.shape[-2]  # back to the original pixels
            boxes = out["boxes"].cpu() * torch.tensor([sx, sy, sx, sy])
            results += coco_results(rec["image_id"], boxes, out["scores"].cpu(), out["labels"].cpu())
    return results


def dummy_results(train: list[dict], evaluation: list[dict]) -> list[dict]:
    """One centred box of the training boxes' mean relative size and the most frequent class, per image."""
    rel, labels = [], Counter()
    for r in train:
        b = r["boxes"]
        if len(b):
            rel.append(torch.stack([(b[:, 2] - b[:, 0]) / r["width"], (b[:, 3] - b[:, 1]) / r["height"]], 1))
            labels.update(r["labels"].tolist())
    rw, rh = torch.cat(rel).mean(0).tolist() if rel else (0.5, 0.5)
    label = labels.most_common(1)[0][0] if labels else 1
    results = []
    for r in evaluation:
        w, h = rw * r["width"], rh * r["height"]
        box = torch.tensor([[(r["width"] - w) / 2, (r["height"] - h) / 2, (r["width"] + w) / 2, (r["height"] + h) / 2]])
        results += coco_results(r["image_id"], box, torch.ones(1), torch.tensor([label]))
    return results


def coco_evaluation(ground_truth: dict, results: list[dict], class_names: list[str]) -> EvalResult:
    """COCO mAP of ``results`` against the COCO ``ground_truth``, per class too, and a note per class without boxes."""
    metrics, per_class = coco_map(ground_truth, results, class_names)
    return EvalResult(
        metrics,
        predictions=results,
        per_class=per_class,
        extra={"ground_truth": ground_truth, "notes": no_ground_truth_notes(per_class)},
    )
