"""Scoring and pictures of the segmentation task: the confusion matrix and the metrics read from it (mIoU, Dice,
per class), the dummy that predicts one class everywhere, masks drawn over images, and the evaluate stage's report
files (test pictures, per-class IoU, the predicted masks as PNGs with how to rescore them)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cv_models.base import EvalResult, never_predicted
from cv_models.segmentation.data import SegmentationDataset

# colours for drawing when data.options.colors is not given (background first, black)
PALETTE = [
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
]

Overlay = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, str]]  # (image, mask) -> (picture, caption)


# ------------------------------------------------------------------------ scoring
def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """``num_classes x num_classes`` pixel counts, rows = true class, ignored pixels left out."""
    valid = target != ignore_index
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


def confusion_scores(cm: torch.Tensor, names: list[str]) -> EvalResult:
    """mIoU, pixel accuracy, Dice and the per-class table of a confusion matrix."""
    cm = cm.double()
    tp, gt, pr = cm.diag(), cm.sum(1), cm.sum(0)
    union = gt + pr - tp
    # a class absent from both truth and prediction has no IoU: left out of the means
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.nan)
    dice = torch.where(gt + pr > 0, 2 * tp / (gt + pr).clamp_min(1), torch.nan)
    per_class = pd.DataFrame(
        {
            "class": names,
            "iou": iou.numpy(),
            "dice": dice.numpy(),
            "precision": (tp / pr.clamp_min(1)).numpy(),
            "recall": (tp / gt.clamp_min(1)).numpy(),
            "true_pixels": gt.long().numpy(),
            "predicted_pixels": pr.long().numpy(),
        }
    )
    metrics = {
        "miou": float(iou.nanmean()) if (union > 0).any() else 0.0,
        "pixel_accuracy": float(tp.sum() / cm.sum().clamp_min(1)),
        "dice": float(dice.nanmean()) if (gt + pr > 0).any() else 0.0,
        "predicted_classes": int((pr > 0).sum()),  # 1: every pixel gets the same class
        **{f"iou/{c}": float(v) for c, v in zip(names, iou.tolist()) if v == v},
        **never_predicted(names, gt.tolist(), pr.tolist()),
    }
    return EvalResult(metrics, per_class=per_class, extra={"confusion_matrix": cm.long().numpy()})


def most_frequent_class_result(
    train: SegmentationDataset, evaluation: SegmentationDataset, names: list[str], ignore_index: int
) -> EvalResult:
    """The dummy: the most frequent training class everywhere, scored against the original masks."""
    n = len(names)
    counts = torch.zeros(n, dtype=torch.long)
    for i in range(len(train)):
        m = train.mask(i).long()
        counts += torch.bincount(m[m < n], minlength=n)
    most_frequent = int(counts.argmax())
    cm = torch.zeros(n, n, dtype=torch.long)
    for i in range(len(evaluation)):
        mask = evaluation.mask(i).long()
        cm += confusion(torch.full_like(mask, most_frequent), mask, n, ignore_index)
    result = confusion_scores(cm, names)
    result.extra["most_frequent_class"] = names[most_frequent]
    return result


# ------------------------------------------------------------------------ pictures
def class_colors(declared: list[tuple[int, int, int]] | None, n_classes: int) -> list[tuple[int, int, int]]:
    """One colour per class: ``data.options.colors``, else the :data:`PALETTE`'s."""
    if declared:
        return [tuple(int(v) for v in c) for c in declared]
    return [PALETTE[k % len(PALETTE)] for k in range(n_classes)]


def mask_overlay(image, target, colours: list[tuple[int, int, int]], ignore_index: int) -> tuple[torch.Tensor, str]:
    """uint8 picture of the image with the mask's classes in their colours (ignored pixels white)."""
    from torchvision.utils import draw_segmentation_masks

    from cv_models.visualise import to_uint8

    target = target.as_subclass(torch.Tensor)
    text = ""
    if target.is_floating_point():  # MixUp's soft targets: draw the dominant class
        weight, target = target.max(0)
        labelled = weight[weight > 0]
        text = f"soft: top weight >= {float(labelled.min()) if labelled.numel() else 0:.2f}"
    target = target.long().squeeze(0)
    layers = torch.stack([target == k for k in range(1, len(colours))] + [target == ignore_index])
    picture = draw_segmentation_masks(to_uint8(image), layers, alpha=0.6, colors=colours[1:] + [(255, 255, 255)])
    return picture, text


# ------------------------------------------------------------------------ report files
def prediction_grid(
    results: dict[str, EvalResult], plain: SegmentationDataset, draw: Overlay, out_dir: Path
) -> list[Path]:
    """Test images with the true masks and each model's predicted masks (``test_predictions.png``)."""
    from cv_models.visualise import caption, save_grid

    models = [name for name, res in results.items() if res.predictions]
    if not models:
        return []
    n = min(len(results[name].predictions) for name in models)
    pictures = []
    for i in range(n):
        image, mask = plain[i]
        pictures.append(caption(draw(image, mask)[0].float() / 255, f"truth {Path(plain.samples[i]['path']).name}"))
        pictures += [caption(draw(image, results[name].predictions[i])[0].float() / 255, name) for name in models]
    path = out_dir / "test_predictions.png"
    save_grid(pictures, path, nrow=1 + len(models))
    return [path]


def per_class_iou(results: dict[str, EvalResult], out_dir: Path) -> Path:
    """Each model's IoU per class (``per_class_iou.csv``)."""
    table = pd.concat([res.per_class.assign(model=name) for name, res in results.items() if res.per_class is not None])
    path = out_dir / "per_class_iou.csv"
    table.pivot_table(index="class", columns="model", values="iou", sort=False).to_csv(path)
    return path


def write_masks(
    results: dict[str, EvalResult], test: SegmentationDataset, out_dir: Path, names: list[str], ignore_index: int
) -> list[Path]:
    """Each model's predicted class-index PNGs and the ground truth they were scored against, at each image's
    own resolution, named after the image (``masks.csv`` lists them), and how to rescore them."""
    models = [name for name, res in results.items() if "masks" in res.extra]
    if not models:
        return []
    rows, used = [], set()
    for i, sample in enumerate(test.samples):
        stem = Path(sample["path"]).stem
        name = stem if stem not in used else f"{stem}_{i}"
        used.add(name)
        row = {"image": sample["path"], "ground_truth": f"ground_truth/{name}.png"}
        arrays = {"ground_truth": test.mask(i).numpy()} | {m: results[m].extra["masks"][i] for m in models}
        for m in models:
            row[m] = f"masks_{m}/{name}.png"
        for key, array in arrays.items():
            path = out_dir / row[key]
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(array.astype(np.uint8)).save(path)
        rows.append(row)
    pd.DataFrame(rows).to_csv(out_dir / "masks.csv", index=False)
    (out_dir / "RECOMPUTE.md").write_text(recompute_text(names, ignore_index))
    return [out_dir / "masks.csv", out_dir / "RECOMPUTE.md"]


def recompute_text(names: list[str], ignore_index: int) -> str:
    """RECOMPUTE.md: how to rescore the written masks without the project."""
    n = len(names)
    return (
        f"# Rescoring the test masks\n\n`masks.csv` lists every test image with its ground truth "
        f"(`ground_truth/`: the class indices scored, {ignore_index} = unlabelled, left out) and each model's "
        f"predicted class indices (`masks_<model>/`), all at the image's own resolution. Classes 0..{n - 1}: "
        f"{names}. mIoU over the classes present in the truth or the prediction, pixels summed over "
        f"all images (the dummy predicts its most frequent class everywhere: no files):\n\n```python\n"
        f"import numpy as np, pandas as pd\nfrom PIL import Image\n\n"
        f"rows = pd.read_csv('masks.csv')\ninter, union = np.zeros({n}), np.zeros({n})\n"
        f"for r in rows.itertuples():\n"
        f"    truth, pred = np.asarray(Image.open(r.ground_truth)), np.asarray(Image.open(r.augmented))\n"
        f"    valid = truth != {ignore_index}\n"
        f"    for k in range({n}):\n"
        f"        t, p = (truth == k) & valid, (pred == k) & valid\n"
        f"        inter[k] += (t & p).sum()\n        union[k] += (t | p).sum()\n"
        f"print('miou', (inter[union > 0] / union[union > 0]).mean())  # metrics.json: augmented.miou\n```\n"
    )
