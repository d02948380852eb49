"""Box and mask scoring of instance segmentation with pycocotools: model outputs and ground truth as COCO dicts
(masks as compressed RLE), at the training size or at each image's own resolution, box and mask mAP, and the
dummy baseline's one centred box-shaped instance per image."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch

from cv_models.base import in_order

COCO_STATS = ("map", "map50", "map75", "map50_maxdets100")  # reported for boxes and masks (and max_dets once)


def encode_mask(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_scores(gt: dict, results: list[dict], class_names: list[str]) -> tuple[dict[str, float], pd.DataFrame]:
    """Box and mask mAP@[.5:.95], mAP@.5 and mAP@.75 with pycocotools (the detection task's helper,
    once per IoU type), and per-class AP@.5 of boxes and masks."""
    from cv_models.data.coco import coco_map

    metrics, tables = {}, {}
    for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
        # pycocotools adds fields to the dicts it is given: score copies, export the originals
        m, per_class = coco_map(copy.deepcopy(gt), copy.deepcopy(results), class_names, iou_type)
        metrics.update({f"{prefix}_{k}": m[k] for k in COCO_STATS} | {"max_dets": m["max_dets"]})
        scored = per_class[per_class["n_boxes"] > 0]  # a class without ground truth has no AP (NaN in the table)
        metrics.update({f"{prefix}_ap50/{c}": float(v) for c, v in zip(scored["class"], scored["ap50"])})
        tables[prefix] = per_class
    per_class = pd.DataFrame(
        {
            "class": class_names,
            "mask_ap": tables["mask"]["ap"],
            "mask_ap50": tables["mask"]["ap50"],
            "box_ap": tables["box"]["ap"],
            "box_ap50": tables["box"]["ap50"],
            "gt_instances": tables["mask"]["n_boxes"],
        }
    )
    return metrics, per_class


def ground_truth_entries(target: dict, image_id: int, start_id: int) -> list[dict]:
    out = []
    for k, (mask, box, label) in enumerate(zip(target["masks"], target["boxes"], target["labels"])):
        m = mask.cpu().numpy().astype(bool)
        x0, y0, x1, y1 = [float(v) for v in box]
        out.append(
            {
                "id": start_id + k,
                "image_id": image_id,
                "category_id": int(label),
                "segmentation": encode_mask(m),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float(m.sum()),
                "iscrowd": 0,
            }
        )
    return out


def to_image_size(output: dict, size: tuple[int, int], image_size: tuple[int, int]) -> dict:
    """A Mask R-CNN output for an input of ``size`` (h, w) mapped to the image's own ``image_size`` (H, W):
    boxes scaled, mask probabilities resized (bilinear), so they are thresholded at 0.5 there."""
    import torch.nn.functional as F

    (h, w), (H, W) = size, image_size
    if (h, w) == (H, W):
        return output
    out = dict(output)
    out["boxes"] = output["boxes"] * torch.tensor([W / w, H / h, W / w, H / h])
    masks = output["masks"]
    out["masks"] = (
        F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=False)
        if len(masks)
        else torch.zeros((0, 1, H, W))
    )
    return out


def result_entries(output: dict, image_id: int, mask_threshold: float = 0.5) -> list[dict]:
    """Model output of one image as COCO results (boxes xywh, masks as compressed RLE)."""
    masks = (output["masks"][:, 0] > mask_threshold).cpu().numpy() if "masks" in output else None
    out = []
    for k, (box, label, score) in enumerate(
        zip(output["boxes"].tolist(), output["labels"].tolist(), output["scores"].tolist())
    ):
        x0, y0, x1, y1 = box
        out.append(
            {
                "image_id": image_id,
                "category_id": int(label),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(score),
                "segmentation": encode_mask(masks[k]),
            }
        )
    return out


def native_ground_truth(dataset, indices: list[int], categories: list[dict]) -> dict:
    """COCO ground truth of the records at ``indices``, at each image's own resolution (with file_name,
    width, height): the original masks, boxes from their extent. Decoded once per dataset object."""
    cache = dataset.__dict__.setdefault("_native_gt", {})
    images, anns = [], []
    for i in indices:
        r = dataset.records[i]
        if i not in cache:
            t = dataset.target(i, r["width"], r["height"])
            keep = t["masks"].flatten(1).sum(1) > 0  # as the evaluation's TidyInstances(1, 0): no empty instance
            plain = {
                "masks": t["masks"].as_subclass(torch.Tensor)[keep],
                "labels": t["labels"][keep],
                "boxes": t["boxes"].as_subclass(torch.Tensor)[keep],
            }
            cache[i] = ground_truth_entries(plain, int(r["image_id"]), 0)
        images.append(
            {"id": int(r["image_id"]), "file_name": r["file_name"], "width": r["width"], "height": r["height"]}
        )
        anns += [{**a, "id": len(anns) + k + 1} for k, a in enumerate(cache[i])]
    return {"images": images, "annotations": anns, "categories": categories}


@torch.no_grad()
def predict(model, loader, device, native: bool, categories: list[dict]) -> tuple[dict, list[dict]]:
    """Ground truth and model results as COCO dicts: at each image's own resolution (``native``, as
    :func:`to_image_size` maps them) or at the training size (the per-epoch validation, cheaper)."""
    model.eval()
    dataset, order = in_order(loader.dataset)
    gt_images, gt_anns, results, seen = [], [], [], 0
    for images, targets in loader:
        outputs = model([im.to(device) for im in images])
        for image, target, output in zip(images, targets, outputs):
            image_id = int(target["image_id"])
            output = {k: v.cpu() for k, v in output.items()}
            if native:
                r = dataset.records[order[seen]]
                output = to_image_size(output, tuple(image.shape[-2:]), (r["height"], r["width"]))
            else:
                h, w = image.shape[-2:]
                gt_images.append({"id": image_id, "width": int(w), "height": int(h)})
                gt_anns += ground_truth_entries(target, image_id, len(gt_anns) + 1)
            results += result_entries(output, image_id)
            seen += 1
    if native:
        return native_ground_truth(dataset, order, categories), results
    return {"images": gt_images, "annotations": gt_anns, "categories": categories}, results


def dummy_shape(images: pd.DataFrame, anns: pd.DataFrame, class_names: list[str]) -> tuple[float, float, int]:
    """The dummy's instance: mean training instance width and height relative to the image, and the most
    frequent training class's label (a quarter of the image and label 1 without training instances)."""
    tr = anns[(anns["split"] == "train") & anns["decodes"] & anns["non_empty"]]
    sizes = images.drop_duplicates("split_image_id").set_index("split_image_id")
    label_of = {c: k + 1 for k, c in enumerate(class_names)}
    rel_w, rel_h, label = 0.25, 0.25, 1
    if len(tr):
        key = tr["split"] + "/" + tr["image_id"].astype(str)
        rel_w = float(((tr["x1"] - tr["x0"]) / key.map(sizes["width"])).mean())
        rel_h = float(((tr["y1"] - tr["y0"]) / key.map(sizes["height"])).mean())
        label = label_of.get(tr["category"].mode().iloc[0], 1)
    return rel_w, rel_h, label


def dummy_results(gt: dict, rel_w: float, rel_h: float, label: int) -> list[dict]:
    """One box-shaped instance per ground-truth image, centred, of the given relative size, scored 1."""
    results = []
    for im in gt["images"]:
        h, w, image_id = im["height"], im["width"], im["id"]
        bw, bh = max(1, round(rel_w * w)), max(1, round(rel_h * h))
        x0, y0 = (w - bw) // 2, (h - bh) // 2
        mask = np.zeros((h, w), dtype=bool)
        mask[y0 : y0 + bh, x0 : x0 + bw] = True
        results.append(
            {
                "image_id": image_id,
                "category_id": label,
                "bbox": [x0, y0, bw, bh],
                "score": 1.0,
                "segmentation": encode_mask(mask),
            }
        )
    return results
