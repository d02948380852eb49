"""Pictures a person looks at: sample grids, captions, confusion matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """float CxHxW in [0, 1] (values outside are clipped) -> uint8."""
    return (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def caption(image: torch.Tensor, text: str, min_width: int = 128) -> torch.Tensor:
    """The image (upscaled for legibility) with a caption strip underneath; uint8 CxHxW."""
    img = Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy())
    if img.width < min_width:
        scale = min_width / img.width
        img = img.resize((min_width, round(img.height * scale)), Image.NEAREST)
    canvas = Image.new("RGB", (img.width, img.height + 14), (255, 255, 255))
    canvas.paste(img, (0, 0))
    ImageDraw.Draw(canvas).text((2, img.height + 1), text, fill=(0, 0, 0))
    return torch.from_numpy(np.array(canvas)).permute(
        2, 0, 1
    )  # np.array: a writable copy (torch warns on a read-only one)


def save_grid(pictures: list[torch.Tensor], path: Path, nrow: int = 8) -> Path:
    """uint8 CxHxW pictures (resized to the first one's size) tiled into one PNG."""
    h, w = pictures[0].shape[-2:]
    same = [
        p
        if p.shape[-2:] == (h, w)
        else torch.nn.functional.interpolate(p[None].float(), size=(h, w)).to(torch.uint8)[0]
        for p in pictures
    ]
    grid = make_grid(torch.stack(same), nrow=nrow, padding=2, pad_value=255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def confusion_matrix_figure(cm: np.ndarray, class_names: list[str], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(class_names), 1.0 + 0.6 * len(class_names)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black"
            )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def history_figure(history, metric: str, path: Path) -> Path:
    """Train and validation loss and the validation metric per epoch (from the history table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(history["epoch"], history["train_loss"], label="train loss (augmented batches)")
    validated = history.dropna(subset=[f"val_{metric}"])  # train.val_every: other epochs have no val metrics
    for col, label in (("train_loss_plain", "train loss"), ("val_loss", "val loss")):
        if col in history:
            a.plot(
                validated["epoch"], validated[col], label=label, marker="." if len(validated) < len(history) else None
            )
    a.set_xlabel("epoch")
    a.legend()
    if f"train_{metric}" in history:
        b.plot(validated["epoch"], validated[f"train_{metric}"], label=f"train {metric}", color="tab:blue")
    b.plot(validated["epoch"], validated[f"val_{metric}"], label=f"val {metric}", color="tab:green")
    b.set_xlabel("epoch")
    b.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
