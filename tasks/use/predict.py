"""The predict stage: a trained model on new images (a folder, a file or a glob).

    python -m tasks predict --task detection --model best --input photos/ --out predictions/

What it writes under ``--out`` (the task decides the content, :meth:`CVTask.predict_image`):

* classification: ``predictions.csv`` (one row per image: class, score, ``prob_<class>`` per class);
* segmentation: ``masks/<stem>.png`` class-index masks at the input's resolution, ``predictions.csv``
  (fraction of pixels per class) and ``overlays/<stem>.png``;
* detection / instance segmentation: ``coco_results.json`` (COCO results; boxes in the input's pixels,
  instance masks as compressed RLE) and ``overlays/<stem>.png``;
* always ``images.json`` (COCO ``images`` entries: the id each result refers to, file, width, height),
  ``summary.json`` / ``summary.md`` (images, skipped files, notes, objects per class, seconds, images/s) and
  ``skipped.csv`` (file, rule: every input that was not predicted, and why).

Images are resized and normalised exactly as the evaluation does. Each file first passes validate's checks,
read from its header without decoding it (:func:`cv_models.data.probe.screen_image`): a file that cannot be
read, a decompression bomb or an image above the task's ``data.max_size`` is named with the rule and skipped;
one below ``data.min_size`` is predicted with a note. The other images are still predicted and written. The
command fails only when nothing could be predicted, or with ``--strict`` when anything was skipped.
"""

from __future__ import annotations

import glob
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from cv_models.data.probe import BOMB_ERRORS, IMAGE_SUFFIXES, screen_image
from tasks.use.inference import Loaded, ModelError, load


class InputError(ValueError):
    """No image to predict on (an empty folder, a glob that matches nothing)."""


class PredictionFailures(RuntimeError):
    """Nothing could be predicted, or (``strict``) some inputs were skipped; everything else was written."""


def list_inputs(spec: str | Path) -> list[Path]:
    """A folder (every image file in it, recursively), one file, or a glob pattern."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise InputError(f"{path}: folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    if path.is_file():
        return [path]
    if any(c in str(spec) for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise InputError(f"{spec}: the pattern matches no file")
        return files
    raise InputError(f"{spec}: no such file or folder")


def screened_image(path: Path, data) -> tuple[Image.Image | None, list[str], str | None]:
    """The image as RGB once it passes validate's checks (``data``: the task's data settings), the notes on it,
    and the rule it broke (then the image is None)."""
    rule, note = screen_image(path, data.min_size, data.max_size)
    if rule:
        return None, [], rule
    try:
        image, converted = read_image(path)
    except (*BOMB_ERRORS, UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return None, [], f"not readable as an image ({type(err).__name__}: {err})"
    return image, [f"{path}: {n}" for n in (note, converted) if n], None


def read_image(path: Path) -> tuple[Image.Image, str | None]:
    """The image as RGB, and a note when it had to be converted (grayscale, palette, RGBA ...)."""
    with Image.open(path) as im:
        im.load()  # a truncated file opens but fails here
        if im.mode == "RGB":
            return im.copy(), None
        return im.convert("RGB"), f"mode {im.mode} converted to RGB"


def _unique_name(stem: str, used: set[str], image_id: int) -> str:
    name = stem if stem not in used else f"{stem}_{image_id}"
    used.add(name)
    return name


def predict_files(loaded: Loaded, files: list[Path], out: Path) -> dict[str, Any]:
    """Predict every file, write the task's results, masks, overlays and the summary; returns the summary."""
    import pandas as pd
    from torchvision.io import write_png

    task = loaded.task
    out.mkdir(parents=True, exist_ok=True)
    records, images, notes, skipped, objects = [], [], [], [], Counter()
    used: set[str] = set()
    start = time.perf_counter()
    for image_id, path in enumerate(files, start=1):
        image, image_notes, rule = screened_image(path, task.cfg.data)
        if image is None:
            skipped.append({"file": str(path), "rule": rule})
            continue
        notes += image_notes
        pred = task.predict_image(loaded.model, image, loaded.normalize, image_id)
        name = _unique_name(path.stem, used, image_id)
        entry = {"id": image_id, "file_name": str(path), "width": image.width, "height": image.height}
        if pred.mask is not None:
            (out / "masks").mkdir(exist_ok=True)
            Image.fromarray(pred.mask).save(out / "masks" / f"{name}.png")
            entry["mask"] = f"masks/{name}.png"
        if pred.overlay is not None:
            (out / "overlays").mkdir(exist_ok=True)
            write_png(pred.overlay.cpu(), str(out / "overlays" / f"{name}.png"))
            entry["overlay"] = f"overlays/{name}.png"
        images.append(entry)
        records += task.result_rows(str(path), pred.records)
        objects.update(pred.objects)
    seconds = time.perf_counter() - start
    task.write_results(records, out)
    (out / "images.json").write_text(json.dumps(images, indent=1))
    pd.DataFrame(skipped, columns=["file", "rule"]).to_csv(out / "skipped.csv", index=False)
    failures = [f"{s['file']}: {s['rule']}; skipped" for s in skipped]
    summary = {
        "task": task.name,
        "model": loaded.source,
        "images": len(images),
        "failed": len(failures),
        "skipped": skipped,
        "objects_per_class": {c: objects.get(c, 0) for c in task.counted_classes()},
        "seconds": round(seconds, 3),
        "images_per_second": round(len(images) / seconds, 3) if seconds > 0 else None,
        "results": task.results_file,
        "failures": failures,
        "notes": notes,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary, task.counted_as))
    return summary


def summary_markdown(s: dict, what: str) -> str:
    """``what``: what the per-class counts count (the task's ``counted_as``)."""
    lines = [
        f"# Predictions: {s['task']}",
        "",
        f"- model: {s['model']}",
        f"- images: {s['images']} predicted, {s['failed']} skipped (`skipped.csv`: file, rule)",
        f"- time: {s['seconds']:.2f} s ({s['images_per_second']} images/s)",
        f"- results: {s['results']}",
        "",
        f"| class | {what} |",
        "|---|---|",
    ]
    lines += [f"| {c} | {n} |" for c, n in s["objects_per_class"].items()]
    for title, items in (("Skipped inputs", s["failures"]), ("Notes", s["notes"])):
        if items:
            lines += ["", f"## {title}", ""] + [f"- {x}" for x in items]
    return "\n".join(lines) + "\n"


def run(
    task_name: str,
    model: str,
    inputs: str,
    out: str | Path,
    params_path: str | Path = "params.yaml",
    overrides: dict[str, Any] | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Load ``model`` for ``task_name``, predict ``inputs``; after writing everything, raises
    :class:`PredictionFailures` when no file could be predicted, or (``strict``) when any was skipped."""
    from tasks.training import engine

    tracking = None
    if model.startswith("models:/"):
        from tasks.config import load_params
        from tasks.track.tracking import tracking_uri

        tracking = tracking_uri(load_params(params_path, overrides)) if Path(params_path).exists() else None
    files = list_inputs(inputs)  # an empty input fails before the model is loaded
    loaded = load(task_name, model, tracking)
    engine.set_threads(loaded.task.cfg.train.num_threads)
    summary = predict_files(loaded, files, Path(out))
    print(
        f"[predict {task_name}] {summary['images']} image(s) predicted with {loaded.source} in {summary['seconds']:.2f} s "
        f"-> {Path(out) / summary['results']}; objects per class: {summary['objects_per_class']}"
    )
    for note in summary["notes"]:
        print(f"note: {note}")
    report = "\n  ".join(summary["failures"])
    if summary["failures"] and (strict or not summary["images"]):
        raise PredictionFailures(
            f"{len(summary['failures'])} of {len(files)} input(s) skipped (the others are written to {out}; "
            f"the list: {Path(out) / 'skipped.csv'}):\n  {report}"
        )
    if summary["failures"]:
        print(
            f"skipped {len(summary['failures'])} of {len(files)} input(s) (list: {Path(out) / 'skipped.csv'}):\n  {report}",
            file=sys.stderr,
        )
    return summary


__all__ = ["InputError", "ModelError", "PredictionFailures", "list_inputs", "predict_files", "run"]
