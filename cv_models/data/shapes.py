"""Deterministic synthetic "shapes" data shared by all four CV tasks.

One renderer draws scenes of coloured shapes on textured, noisy backgrounds.
The same scenes are written in the formats real datasets use:

* classification: ImageFolder, ``classification/<split>/<class>/<id>.png`` (one shape per image)
* semantic segmentation: ``scenes/images/<split>/<id>.png`` plus single-channel
  PNG class-index masks ``scenes/masks/<split>/<id>.png`` (0 = background, class k = k)
* detection and instance segmentation: COCO JSON ``scenes/annotations/<split>.json``
  with boxes and masks (polygons for unoccluded shapes, RLE for occluded ones)

Everything is drawn from one ``numpy.random.Generator`` seeded from params, so the
same params give byte-identical files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pydantic import Field, field_validator

from cv_models.settings import Strict

SHAPE_VERTICES = {
    "circle": None,  # drawn as a 32-gon so that polygon and raster agree
    "square": 4,
    "triangle": 3,
    "star": 10,
    "hexagon": 6,
    "pentagon": 5,
}
SPLITS = ("train", "val", "test")


@dataclass
class Instance:
    class_index: int  # 0-based index into the class list
    mask: np.ndarray  # bool HxW, visible pixels only
    polygon: list[float]  # flat x0,y0,x1,y1,... of the full (unoccluded) outline
    occluded: bool = False


def shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Outline of a shape as a list of (x, y) vertices."""
    if kind not in SHAPE_VERTICES:
        raise ValueError(f"unknown shape class {kind!r}; known: {sorted(SHAPE_VERTICES)}")
    if kind == "circle":
        n, radii = 32, [radius] * 32
    elif kind == "star":
        n, radii = 10, [radius if i % 2 == 0 else radius * 0.45 for i in range(10)]
    else:
        n = SHAPE_VERTICES[kind]
        radii = [radius] * n
    return [
        (cx + r * math.cos(angle + 2 * math.pi * i / n), cy + r * math.sin(angle + 2 * math.pi * i / n))
        for i, r in enumerate(radii)
    ]


def textured_background(rng: np.random.Generator, size: int, noise: float = 8.0) -> np.ndarray:
    """Low-frequency colour texture plus pixel noise, float32 HxWx3 in [0, 255]."""
    base = rng.uniform(40, 215, size=3)
    coarse = rng.normal(0, 35, size=(4, 4, 3))
    texture = (
        np.asarray(
            Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
            dtype=np.float32,
        )
        - 128
    )
    stripes = 12 * np.sin(np.linspace(0, rng.uniform(2, 12) * math.pi, size))[None, :, None]
    if rng.random() < 0.5:
        stripes = stripes.transpose(1, 0, 2)
    noise = rng.normal(0, noise, size=(size, size, 3))
    return np.clip(base + texture + stripes + noise, 0, 255)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    mean = background.reshape(-1, 3).mean(0)
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - mean).sum() > 110:
            return colour
    return 255 - mean


def render_scene(
    rng: np.random.Generator,
    size: int,
    class_names: list[str],
    n_objects: int,
    scale: tuple[float, float],
    clutter: int = 2,
    noise: float = 8.0,
) -> tuple[np.ndarray, list[Instance]]:
    """Render one image (uint8 HxWx3) and its visible instances, later shapes on top.

    ``noise`` is the pixel-noise std (0-255 scale) of background and shapes alike.
    """
    image = textured_background(rng, size, noise)
    instances: list[Instance] = []
    for _ in range(n_objects):
        class_index = int(rng.integers(len(class_names)))
        radius = rng.uniform(*scale) * size / 2
        cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, size=2)
        polygon = shape_polygon(class_names[class_index], cx, cy, radius, rng.uniform(0, 2 * math.pi))
        canvas = Image.new("L", (size, size), 0)
        ImageDraw.Draw(canvas).polygon(polygon, fill=1)
        mask = np.asarray(canvas, dtype=bool)
        if mask.sum() < 9:
            continue
        colour = _contrasting_colour(rng, image)
        shading = rng.normal(0, noise, size=(size, size, 1))
        image = np.where(mask[..., None], np.clip(colour + shading, 0, 255), image)
        for earlier in instances:
            if (earlier.mask & mask).any():
                earlier.occluded = True
            earlier.mask &= ~mask
        flat = [round(float(v), 2) for xy in polygon for v in xy]
        instances.append(Instance(class_index, mask, flat))
    # clutter: thin random lines that belong to no class
    pil = Image.fromarray(image.astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(0, clutter + 1))):
        x0, y0, x1, y1 = rng.uniform(0, size, size=4)
        draw.line([(x0, y0), (x1, y1)], fill=tuple(int(c) for c in rng.uniform(0, 255, 3)), width=1)
    if rng.random() < 0.3:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    instances = [inst for inst in instances if inst.mask.sum() >= 9]
    return np.asarray(pil), instances


def _split_of(index: int, n: int, fractions: dict[str, float]) -> str:
    train_end = round(n * fractions["train"])
    val_end = train_end + round(n * fractions["val"])
    return "train" if index < train_end else "val" if index < val_end else "test"


def write_classification(out: Path, cfg: ShapesConfig, rng: np.random.Generator) -> dict:
    classes, size, n = cfg.classes, cfg.image_size, cfg.classification.num_images
    counts: dict[str, int] = {}
    for i in range(n):
        split = _split_of(i, n, cfg.splits)
        class_index = i % len(classes)  # balanced: every class present in every split
        image, instances = _render_one_class(rng, size, classes, class_index, cfg.classification)
        folder = out / "classification" / split / classes[class_index]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")
        counts[split] = counts.get(split, 0) + 1
    return counts


def _render_one_class(rng, size, classes, class_index, cfg: ShapesClassification):
    """A scene with exactly one shape of the wanted class (re-drawn until it is visible)."""
    lo, hi = cfg.scale
    for _ in range(50):
        image, instances = render_scene(
            rng, size, [classes[class_index]], 1, (lo, hi), clutter=cfg.clutter, noise=cfg.noise
        )
        if instances:
            return image, instances
    raise RuntimeError("could not render a visible shape; check shapes.image_size")


def mask_to_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def write_scenes(out: Path, cfg: ShapesConfig, rng: np.random.Generator) -> dict:
    scenes = cfg.scenes
    classes, size, n = cfg.classes, scenes.image_size, scenes.num_images
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(classes)]
    cocos = {s: {"images": [], "annotations": [], "categories": categories} for s in SPLITS}
    ann_id = 1
    for i in range(n):
        split = _split_of(i, n, cfg.splits)
        n_objects = int(rng.integers(scenes.min_objects, scenes.max_objects + 1))
        image, instances = render_scene(
            rng, size, classes, n_objects, tuple(scenes.scale), clutter=scenes.clutter, noise=scenes.noise
        )
        name = f"{i:05d}.png"
        for sub in ("images", "masks"):
            (out / "scenes" / sub / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out / "scenes" / "images" / split / name)
        class_mask = np.zeros((size, size), dtype=np.uint8)
        for inst in instances:  # instances are already de-occluded, so order does not matter
            class_mask[inst.mask] = inst.class_index + 1
        Image.fromarray(class_mask, mode="L").save(out / "scenes" / "masks" / split / name)
        image_id = i + 1
        cocos[split]["images"].append({"id": image_id, "file_name": f"{split}/{name}", "width": size, "height": size})
        for inst in instances:
            ys, xs = np.nonzero(inst.mask)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            segmentation = mask_to_rle(inst.mask) if inst.occluded else [inst.polygon]
            cocos[split]["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": inst.class_index + 1,
                    "bbox": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)],
                    "area": int(inst.mask.sum()),
                    "iscrowd": 0,
                    "segmentation": segmentation,
                }
            )
            ann_id += 1
    (out / "scenes" / "annotations").mkdir(parents=True, exist_ok=True)
    for split, coco in cocos.items():
        (out / "scenes" / "annotations" / f"{split}.json").write_text(json.dumps(coco))
    return {s: len(c["images"]) for s, c in cocos.items()}


# ---------------------------------------------------------------- settings (``shapes:`` in params.yaml)


class ShapesClassification(Strict):
    num_images: int = Field(1200, ge=1)
    scale: tuple[float, float] = (0.35, 0.9)  # shape size as a fraction of the image
    clutter: int = Field(3, ge=0)  # up to this many random distractor lines
    noise: float = Field(8.0, ge=0)  # pixel-noise std (0-255)


class ShapesScenes(Strict):
    num_images: int = Field(300, ge=1)
    image_size: int = Field(128, ge=16, le=1024)
    min_objects: int = Field(1, ge=0)
    max_objects: int = Field(4, ge=1)
    scale: tuple[float, float] = (0.15, 0.4)
    clutter: int = Field(2, ge=0)
    noise: float = Field(8.0, ge=0)


class ShapesConfig(Strict):
    out_dir: str = "data/shapes"
    seed: int = 0
    image_size: int = Field(64, ge=16, le=1024)
    classes: list[str] = ["circle", "square", "triangle", "star"]
    splits: dict[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}
    classification: ShapesClassification = ShapesClassification()
    scenes: ShapesScenes = ShapesScenes()

    @field_validator("classes")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [c for c in v if c not in SHAPE_VERTICES]
        if unknown or len(v) < 2:
            raise ValueError(f"need at least two of {sorted(SHAPE_VERTICES)}, got {v}")
        return v


def generate(out_dir: str | Path, cfg: ShapesConfig | dict) -> dict:
    """Write the whole synthetic dataset under ``out_dir``; returns image counts per format and split.
    ``cfg``: the ``shapes:`` settings (``params.shapes``, or a plain dict: checked, defaults filled in)."""
    shapes = ShapesConfig.model_validate(cfg)
    out = Path(out_dir)
    # separate streams so that changing the scene count leaves the classification images unchanged
    seeds = np.random.SeedSequence(shapes.seed).spawn(2)
    summary = {
        "classification": write_classification(out, shapes, np.random.default_rng(seeds[0])),
        "scenes": write_scenes(out, shapes, np.random.default_rng(seeds[1])),
    }
    (out / "classes.json").write_text(json.dumps({"classes": shapes.classes, "counts": summary}, indent=2))
    return summary
