"""The export stage: a trained model as a TorchScript or ONNX file that runs without this project.

    python -m tasks export --task detection --model best --format onnx      # -> exports/detection/model.onnx

Beside the file, ``model.json`` says what it takes and gives: input name, shape and layout, resizing,
the normalisation (mean and std, and whether it is applied before the graph or inside it), the class
list, the outputs, and the parity check's measured differences. A parity check runs the exported file
(onnxruntime for ONNX, ``torch.jit.load`` for TorchScript) against the PyTorch model on test images and
fails above the tolerances below. Detections are compared after matching each PyTorch detection with
the exported one of the same class and the highest box IoU.

ONNX uses the TorchScript-based exporter (``dynamo=False``) at opset 17 (torchvision's detection and
Mask R-CNN export this way, with a list of one image as input; ``torch.export`` cannot trace their
data-dependent number of detections). Both formats take images at the training size S.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.use.inference import Loaded, load

OPSET = 17
# stated tolerances (absolute): logits / scores / mask probabilities, box corners in pixels, mask IoU
TOLERANCE = {"logits": 1e-3, "score": 1e-3, "box_px": 0.05, "mask_prob": 1e-2, "mask_iou": 0.98}


class ParityError(RuntimeError):
    """The exported file's outputs differ from PyTorch's by more than the stated tolerance."""


def parity_images(task_name: str, params_path: str | Path, overrides: dict | None, n: int) -> list:
    """Up to ``n`` test-split images of the project's data (PIL, RGB); random images when there is none."""
    from PIL import Image

    try:
        from cv_models import get_task
        from tasks.config import load_params

        task = get_task(task_name, load_params(params_path, overrides).task(task_name))
        test = task.dataset("test", None)
        images = [test[i][0].convert("RGB") for i in range(min(n, len(test)))]
        if images:
            return images
    except Exception as err:  # noqa: BLE001 - no data here: random images still check the arithmetic
        print(f"[export] no test images ({type(err).__name__}: {err}); checking parity on random images")
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)) for _ in range(n)]


def export_file(loaded: Loaded, fmt: str, path: Path, example: torch.Tensor) -> None:
    module = loaded.task.export_module(loaded.model).eval()
    args = (example[None],) if loaded.task.export_batched else (example,)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent shapes: the parity check is the judge
        if fmt == "torchscript":
            traced = torch.jit.trace(module, args, check_trace=False)
            traced.save(str(path))
            return
        names = list(loaded.task.export_outputs)
        dynamic = (
            {"input": {0: "batch"}, **{k: {0: "batch"} for k in names}}
            if loaded.task.export_batched
            else {k: {0: "detections"} for k in names}
        )
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=names,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )


def runner(fmt: str, path: Path):
    """A function running the exported file on one input tensor, returning numpy outputs in export_outputs order."""
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu").eval()

        def run(x: torch.Tensor) -> list[np.ndarray]:
            with torch.no_grad():
                out = module(x)
            return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]

        return run
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the exporter declares 1 detection; onnxruntime warns on every other count
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x.numpy()})


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from torchvision.ops import box_iou

    return box_iou(torch.from_numpy(a).reshape(-1, 4).float(), torch.from_numpy(b).reshape(-1, 4).float()).numpy()


def compare(task, ref: list[np.ndarray], got: list[np.ndarray]) -> dict[str, float]:
    """Largest differences between PyTorch's outputs and the exported file's on one input."""
    if task.export_outputs == ("logits",):
        return {
            "logits": float(np.abs(ref[0] - got[0]).max()),
            "argmax_agreement": float((ref[0].argmax(1) == got[0].argmax(1)).mean()),
        }
    r, g = dict(zip(task.export_outputs, ref)), dict(zip(task.export_outputs, got))
    out = {
        "detections_ref": len(r["boxes"]),
        "detections_exported": len(g["boxes"]),
        "unmatched": 0,
        "box_px": 0.0,
        "score": 0.0,
    }
    if "masks" in r:
        out.update(mask_prob=0.0, mask_iou=1.0)
    iou = (
        _box_iou(r["boxes"], g["boxes"])
        if len(r["boxes"]) and len(g["boxes"])
        else np.zeros((len(r["boxes"]), len(g["boxes"])))
    )
    used: set[int] = set()
    for i in np.argsort(-r["scores"]):
        same = [j for j in range(len(g["boxes"])) if j not in used and g["labels"][j] == r["labels"][i]]
        if not same or iou[i, same].max() < 0.5:
            out["unmatched"] += 1
            continue
        j = same[int(np.argmax(iou[i, same]))]
        used.add(j)
        out["box_px"] = max(out["box_px"], float(np.abs(r["boxes"][i] - g["boxes"][j]).max()))
        out["score"] = max(out["score"], float(abs(r["scores"][i] - g["scores"][j])))
        if "masks" in r:
            a, b = r["masks"][i], g["masks"][j]
            out["mask_prob"] = max(out["mask_prob"], float(np.abs(a - b).max()))
            ma, mb = a > 0.5, b > 0.5
            union = np.logical_or(ma, mb).sum()
            out["mask_iou"] = min(out["mask_iou"], float(np.logical_and(ma, mb).sum() / union) if union else 1.0)
    out["unmatched"] += len(g["boxes"]) - len(used)
    return out


def parity(loaded: Loaded, fmt: str, path: Path, images: list) -> dict[str, Any]:
    """Worst differences over ``images``; raises :class:`ParityError` above :data:`TOLERANCE`."""
    task = loaded.task
    module = task.export_module(loaded.model).eval()
    run = runner(fmt, path)
    worst: dict[str, float] = {}
    for image in images:
        x = task.model_input(image, loaded.normalize)
        x = x[None] if task.export_batched else x
        with torch.no_grad():
            ref = module(x)
        ref = [o.numpy() for o in (ref if isinstance(ref, (tuple, list)) else (ref,))]
        for k, v in compare(task, ref, run(x)).items():
            lower_is_worse = k in ("mask_iou", "argmax_agreement")
            worst[k] = min(worst.get(k, v), v) if lower_is_worse else max(worst.get(k, v), v)
    failures = [
        f"{k} {worst[k]:.3g} {'<' if k == 'mask_iou' else '>'} {TOLERANCE[k]}"
        for k in TOLERANCE
        if k in worst and (worst[k] < TOLERANCE[k] if k == "mask_iou" else worst[k] > TOLERANCE[k])
    ]
    if worst.get("unmatched", 0):
        failures.append(f"{int(worst['unmatched'])} detection(s) without a match in the other model")
    report = {
        "images": len(images),
        "worst": worst,
        "tolerance": {k: TOLERANCE[k] for k in TOLERANCE if k in worst},
        "passed": not failures,
    }
    if failures:
        raise ParityError(
            f"{path}: the exported model differs from PyTorch on {len(images)} image(s): " + "; ".join(failures)
        )
    return report


def describe(loaded: Loaded, fmt: str, path: Path) -> dict[str, Any]:
    """What a user of the exported file needs: input, preprocessing, classes, outputs."""
    task, cfg = loaded.task, loaded.task.cfg
    h, w = cfg.image_hw
    s = f"{h} x {w}"  # height x width
    norm = loaded.normalize
    mean = std = None
    if norm is not None and cfg.normalization != "mean_image":
        mean = norm.mean.tolist()
        std = norm.std.tolist() if norm.std is not None else [1.0, 1.0, 1.0]
    normalization = {
        "mode": cfg.normalization,
        "mean": mean,
        "std": std,
        "applied": "inside the model (pass pixels in [0, 1])"
        if task.normalizes_inside or norm is None
        else "before the model: (pixel / 255 - mean) / std per RGB channel",
    }
    if cfg.normalization == "mean_image":
        np.save(path.with_name("mean_image.npy"), norm.mean.permute(1, 2, 0).numpy())
        normalization.update(mean_image=f"mean_image.npy ({s} x 3, subtract from pixel / 255)")
    shape = ["N", 3, h, w] if task.export_batched else [3, h, w]
    outputs = {
        "classification": {"logits": "N x C class scores (softmax for probabilities), classes in `classes` order"},
        "segmentation": {
            "logits": f"N x C x {s} class scores; argmax over C = class index; resize to the image's size"
        },
        "detection": {
            "boxes": f"D x 4 x0, y0, x1, y1 in the {s} input's pixels (multiply x by W/{w}, y by H/{h})",
            "labels": "D class ids, 1-based: classes[label - 1]",
            "scores": "D confidences, sorted high to low",
        },
    }
    outputs["instance_segmentation"] = {
        **outputs["detection"],
        "masks": f"D x 1 x {s} mask probabilities (threshold 0.5; resize to the image)",
    }
    return {
        "task": task.name,
        "format": fmt,
        "file": path.name,
        "opset": OPSET if fmt == "onnx" else None,
        "torch": torch.__version__,
        "input": {
            "name": "input",
            "shape": shape,
            "dtype": "float32",
            "layout": "RGB, channels first",
            "resize": f"bilinear to {s} (height x width, the training size)",
            "scale": "pixel / 255",
        },
        "image_size": cfg.model_dump(mode="json")["image_size"],
        "normalization": normalization,
        "classes": task.class_names(),
        "outputs": outputs.get(task.name, {k: "" for k in task.export_outputs}),
        "source_model": loaded.source,
    }


def run(
    task_name: str,
    model: str,
    fmt: str,
    out: str | Path | None = None,
    params_path: str | Path = "params.yaml",
    overrides: dict | None = None,
    n_images: int = 8,
) -> dict[str, Any]:
    """Export, check parity, write the description; returns the description (with the parity report)."""
    tracking = None
    if model.startswith("models:/"):
        from tasks.config import load_params
        from tasks.track.tracking import tracking_uri

        tracking = tracking_uri(load_params(params_path, overrides))
    loaded = load(task_name, model, tracking)
    folder = Path(out or Path("exports") / task_name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("model.onnx" if fmt == "onnx" else "model.torchscript.pt")
    images = parity_images(task_name, params_path, overrides, n_images)
    export_file(loaded, fmt, path, loaded.task.model_input(images[0], loaded.normalize))
    meta = describe(loaded, fmt, path)
    try:
        meta["parity"] = parity(loaded, fmt, path, images)
    except ParityError as err:
        meta["parity"] = {"passed": False, "error": str(err)}
        raise
    finally:
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"[export {task_name}] {path} ({fmt}); parity on {meta['parity']['images']} image(s): worst {meta['parity']['worst']} "
        f"within {meta['parity']['tolerance']}; description: {path.with_suffix('.json')}"
    )
    return meta
