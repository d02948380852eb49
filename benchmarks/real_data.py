"""The pipeline against a plain torchvision script on a shared real dataset, at the same wall-clock budget.

    python benchmarks/real_data.py trashnet150 [--budget-minutes 4] [--set key=value ...] [--keep DIR]
    python benchmarks/real_data.py all --keep runs/real --baseline-minutes 1   # every dataset, in turn
    python benchmarks/real_data.py coco128_lightly --seed 1   # another training seed on both sides, same split
    python benchmarks/real_data.py coco128_json --device cuda --plain size=640   # both sides on the GPU
    python benchmarks/real_data.py trashnet150 --from-init   # the settings `python -m tasks init` proposes

For one dataset it
1. runs the pipeline's validate stage with the dataset's settings overlay (benchmarks/real_data/<name>.yaml,
   dotted keys on top of params.yaml: settings only) and writes the split it made to ``manifest.json``
   (every split's files and their ground truth at original resolution): both sides train on the same
   train split and are scored on the same test split;
2. starts the plain script (benchmarks/plain/<task>.py: torchvision model of the same family, images
   preloaded, a textbook loop, no validation, no augmentation beyond the detection tutorial's flip) on
   one core, and at the same time the pipeline on the other: pretraining (when the overlay has it),
   normstats and the augmented stage, stopped by ``train.time_limit_minutes`` within the budget;
3. predicts the test split with both at original resolution (the pipeline through ``tasks.use.predict``)
   and scores both files with the same library call: sklearn (accuracy), numpy (mIoU from the
   confusion matrix), pycocotools (AP@.5 for boxes or masks).

With ``--baseline-minutes M`` the pipeline's baseline stage (dummy score, overfit-one-batch check, every
augmentation off) then runs for M minutes on the same split and is scored the same way: the first three
stages of the pipeline, on each real dataset, with settings only.

Both sides get one torch thread each and run side by side, so the machine's load hits both alike.
``--device`` puts both on the same device (default cpu, so that a GPU machine does not give the pipeline
a GPU and the plain script a core); with cuda they share the GPU as they share the CPU.
Prints a markdown row per dataset; ``result.json`` in the work folder keeps the details.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = REPO / "benchmarks" / "real_data"
# dataset -> task; the overlay file benchmarks/real_data/<dataset>.yaml holds its settings
DATASETS = {
    "trashnet150": "classification",
    "isbi_membrane": "segmentation",
    "bccd": "detection",
    "coco128_lightly": "detection",
    "coco128_json": "instance_segmentation",
}
METRIC = {
    "classification": "accuracy",
    "segmentation": "miou",
    "detection": "map50",
    "instance_segmentation": "mask_map50",
}


# ---------------------------------------------------------------- the split, written once for both sides
def write_manifest(task, out: Path) -> dict:
    """Every split's image files and ground truth at original resolution, as the pipeline split them.
    Segmentation masks are written as class-index PNGs (``ignore`` pixels 255), boxes and instance
    masks as COCO ground truth (category id k+1 for class k)."""
    names = task.class_names()
    manifest = {"task": task.name, "classes": names, "splits": {}}
    truth = GROUND_TRUTH[task.name]
    for split in ("train", "val", "test"):
        ds = task.dataset(split, None)
        manifest["splits"][split] = [truth(ds, i, out / "masks" / split) for i in range(len(ds))]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


# one sample's ground truth in the manifest, per task: (dataset, index, the split's mask folder) -> item
def _label_item(ds, i: int, masks: Path) -> dict:
    return {"path": ds.samples[i]["path"], "label": int(ds.labels[i])}


def _mask_item(ds, i: int, masks: Path) -> dict:
    from PIL import Image

    mask_file = masks / f"{i:05d}.png"
    mask_file.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ds.mask(i).numpy().astype(np.uint8)).save(mask_file)
    return {"path": ds.samples[i]["path"], "mask": str(mask_file)}


def _box_item(ds, i: int, masks: Path) -> dict:
    r = ds.records[i]
    return {
        "path": r["path"],
        "width": r["width"],
        "height": r["height"],
        "boxes": r["boxes"].tolist(),
        "labels": r["labels"].tolist(),
        "iscrowd": r["iscrowd"].tolist(),
    }


def _instance_item(ds, i: int, masks: Path) -> dict:
    """Instance masks as compressed RLE."""
    from pycocotools import mask as mask_utils

    image, target = ds[i]
    rles = []
    for m in target["masks"].numpy():
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rles.append({"size": rle["size"], "counts": rle["counts"].decode()})
    return {
        "path": ds.records[i]["path"],
        "width": image.width,
        "height": image.height,
        "masks": rles,
        "boxes": target["boxes"].tolist(),
        "labels": target["labels"].tolist(),
    }


GROUND_TRUTH = {
    "classification": _label_item,
    "segmentation": _mask_item,
    "detection": _box_item,
    "instance_segmentation": _instance_item,
}


def coco_ground_truth(manifest: dict) -> dict:
    """The test split as COCO ground truth; image ids 1..n in the manifest's order (as tasks.use.predict numbers them)."""
    images, anns = [], []
    for image_id, it in enumerate(manifest["splits"]["test"], start=1):
        images.append({"id": image_id, "file_name": it["path"], "width": it["width"], "height": it["height"]})
        crowd = it.get("iscrowd") or [0] * len(it["labels"])
        for k, (box, label) in enumerate(zip(it["boxes"], it["labels"])):
            x0, y0, x1, y1 = box
            ann = {
                "id": len(anns) + 1,
                "image_id": image_id,
                "category_id": int(label),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": int(crowd[k]),
            }
            if "masks" in it:
                from pycocotools import mask as mask_utils

                ann["segmentation"] = it["masks"][k]
                ann["area"] = float(
                    mask_utils.area({"size": it["masks"][k]["size"], "counts": it["masks"][k]["counts"].encode()})
                )
            anns.append(ann)
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(manifest["classes"])],
    }


# ---------------------------------------------------------------- one scorer for both sides
def score(manifest: dict, pred_dir: Path) -> float:
    """The primary test metric of the predictions in ``pred_dir`` (the layout tasks.use.predict writes)."""
    return scores(manifest, pred_dir)["value"]


def scores(manifest: dict, pred_dir: Path) -> dict:
    """``value``: the primary test metric (:func:`score`); for boxes and masks also ``max_dets``, the COCO maxDets
    every AP was taken at."""
    return SCORERS[manifest["task"]](manifest, pred_dir)


def _accuracy(manifest: dict, pred_dir: Path) -> dict:
    import pandas as pd
    from sklearn.metrics import accuracy_score

    pred = pd.read_csv(pred_dir / "predictions.csv")
    names = manifest["classes"]
    return {
        "value": float(
            accuracy_score([names[it["label"]] for it in manifest["splits"]["test"]], pred["class"].tolist())
        )
    }


def _miou(manifest: dict, pred_dir: Path) -> dict:
    from PIL import Image

    images = json.loads((pred_dir / "images.json").read_text())
    n = len(manifest["classes"])
    cm = np.zeros((n, n), np.int64)
    for it, entry in zip(manifest["splits"]["test"], images):
        gt = np.asarray(Image.open(it["mask"])).astype(np.int64)
        pr = np.asarray(Image.open(pred_dir / entry["mask"])).astype(np.int64)
        keep = gt < n  # 255: not labelled
        cm += np.bincount(gt[keep] * n + pr[keep], minlength=n * n).reshape(n, n)
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return {"value": float(np.nanmean(iou))}


def _coco_map50(iou_type: str):
    def score(manifest: dict, pred_dir: Path) -> dict:
        from cv_models.data.coco import coco_map

        results = json.loads((pred_dir / "coco_results.json").read_text())
        # the pipeline's own scoring: every AP at maxDets = max(100, the busiest image), COCO's 100 only beside it
        metrics, _ = coco_map(coco_ground_truth(manifest), results, manifest["classes"], iou_type)
        return {"value": float(metrics["map50"]), "max_dets": int(metrics["max_dets"])}

    return score


# the primary test metric per task, computed from the files tasks.use.predict writes (METRIC names it)
SCORERS = {
    "classification": _accuracy,
    "segmentation": _miou,
    "detection": _coco_map50("bbox"),
    "instance_segmentation": _coco_map50("segm"),
}


# ---------------------------------------------------------------- the two sides
def overlay(name: str, root: Path) -> dict:
    text = (OVERLAYS / f"{name}.yaml").read_text().replace("{root}", str(root))
    return yaml.safe_load(text)


def init_overlay(name: str, root: Path, spec: dict, kind: str | None = None) -> dict:
    """What ``python -m tasks init [--kind KIND]`` proposes for the dataset at the overlay's budget, as dotted keys in
    place of the hand-written ones (the plain script's settings and the budget stay the overlay's)."""
    from tasks.init import plan

    task = DATASETS[name]
    reading, _, _, choices, _ = plan(root / name, task=task, budget_minutes=spec["budget_minutes"], kind=kind)
    return {
        "budget_minutes": spec["budget_minutes"],
        "plain": spec["plain"],
        f"tasks.{task}.data": reading.data,
        **{f"tasks.{task}.{c.key}": c.value for c in choices},
    }


def start_plain(task: str, work: Path, budget_s: float, settings: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "plain" / f"{task}.py"),
        "--manifest",
        str(work / "manifest.json"),
        "--budget-seconds",
        str(budget_s),
        "--out",
        str(work / "plain"),
        "--settings",
        json.dumps(settings),
    ]
    log = (work / "plain.log").open("w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_pipeline(task_name: str, overrides: dict, budget_s: float, t_start: float) -> dict:
    """Pretraining (when the overlay sets it), normstats and the augmented stage, inside the budget."""
    from tasks import augmented, crops, normstats, pretrain

    if any(k.startswith("pretrain.") for k in overrides):  # crops of the train split's boxes, then a classifier on them
        if any(k.startswith("crops.") for k in overrides):
            crops.run("params.yaml", overrides)
        pretrain.run("params.yaml", overrides)
    normstats.run(task_name, "params.yaml", overrides)
    left = budget_s - (time.perf_counter() - t_start)
    overrides = {**overrides, f"tasks.{task_name}.train.time_limit_minutes": max(left, 30.0) / 60}
    return augmented.run(task_name, "params.yaml", overrides)


def run_baseline(task_name: str, overrides: dict, minutes: float) -> dict:
    """The baseline stage (dummy score, overfit-one-batch check, every augmentation off) within ``minutes``."""
    from tasks import baseline

    return baseline.run(task_name, "params.yaml", {**overrides, f"tasks.{task_name}.train.time_limit_minutes": minutes})


def logged_budget(task_name: str, stage: str, metrics: dict) -> dict:
    """What the training stage logged about its time limit (its timings.json and metrics.json): training seconds ÷
    the limit (``budget_use``), the final learning rate and the one the schedule ends at, the epochs planned."""
    from tasks.paths import outputs

    logged = json.loads((outputs(task_name, stage) / "timings.json").read_text())
    return {
        "train_s": logged["train_seconds"],
        "limit_s": logged.get("time_limit_seconds"),
        "budget_use": logged.get("budget_use"),
        "final_lr": metrics["final_lr"],
        "schedule_end_lr": logged.get("schedule_end_lr"),
        "epochs_planned": metrics["epochs"],
        "epochs_cap": metrics["epochs_cap"],
    }


def predict_pipeline(task_name: str, manifest: dict, out: Path, stage: str = "augmented") -> None:
    from tasks.paths import models, outputs
    from tasks.training import engine
    from tasks.use.inference import load_checkpoint
    from tasks.use.predict import predict_files

    loaded = load_checkpoint(task_name, models(task_name, stage) / "model.pt", outputs(task_name, "normstats"))
    engine.set_threads(1)
    predict_files(loaded, [Path(it["path"]) for it in manifest["splits"]["test"]], out)


def both_sides(
    task_name: str,
    spec: dict,
    extra: dict,
    device: str = "cpu",
    seed: int | None = None,
    plain_extra: dict | None = None,
) -> tuple[dict, dict]:
    """The pipeline's overrides and the plain script's settings from a dataset's overlay (``spec``), the
    command line's ``--set`` (``extra``) and ``--plain`` (``plain_extra``): one device and one seed for both."""
    spec = dict(spec)
    plain_settings = spec.pop("plain")  # the plain script's own few settings (size, batch, lr)
    spec.pop("budget_minutes", None)
    # both sides on one device: the pipeline's training (and pretraining, where the overlay has it), the plain script
    overrides = {f"tasks.{task_name}.train.device": device, **spec, **extra}
    if any(k.startswith("pretrain.") for k in overrides):  # a pretrain key is what switches pretraining on
        overrides.setdefault("pretrain.device", device)
    plain_settings = {**plain_settings, **(plain_extra or {}), "device": device}
    if (
        seed is not None
    ):  # the training seed of both sides; the split's own seed (data.split_seed) stays, so does the split
        overrides["seed"] = seed
        plain_settings = {**plain_settings, "seed": seed}
    return overrides, plain_settings


def benchmark(
    name: str,
    root: Path,
    budget_minutes: float | None,
    extra: dict,
    keep: str | None,
    baseline_minutes: float = 0.0,
    seed: int | None = None,
    device: str = "cpu",
    plain_extra: dict | None = None,
    from_init: bool = False,
    variant: str | None = None,
    kind: str | None = None,
) -> dict:
    from cv_models import get_task
    from tasks import validate
    from tasks.config import load_params

    task_name = DATASETS[name]
    work = Path(keep) / name if keep else Path(tempfile.mkdtemp(prefix=f"real-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    os.chdir(work)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ.setdefault("CV_PIPELINE_RUN_ID", f"real-data-{name}")
    spec = overlay(f"{name}_{variant}" if variant else name, root)
    if from_init:  # the settings init proposes instead of the hand-written overlay
        spec = init_overlay(name, root, spec, kind)
    budget_s = (budget_minutes or spec["budget_minutes"]) * 60
    overrides, plain_settings = both_sides(task_name, spec, extra, device, seed, plain_extra)
    t0 = time.perf_counter()
    report = validate.run(task_name, "params.yaml", overrides)
    cfg = load_params("params.yaml", overrides).task(task_name)
    manifest = write_manifest(get_task(task_name, cfg), work)
    t_validate = time.perf_counter() - t0
    plain = start_plain(task_name, work, budget_s, plain_settings)
    t_start = time.perf_counter()
    run = run_pipeline(task_name, overrides, budget_s, t_start)
    t_pipeline = time.perf_counter() - t_start
    predict_pipeline(task_name, manifest, work / "pipeline")
    if plain.wait() != 0:
        raise SystemExit(
            f"the plain script failed: see {work / 'plain.log'}\n" + (work / "plain.log").read_text()[-3000:]
        )
    plain_info = json.loads((work / "plain" / "run.json").read_text())
    base = None
    if baseline_minutes > 0:  # after the timed comparison: the first three stages of the pipeline on this data
        base_run = run_baseline(task_name, overrides, baseline_minutes)
        predict_pipeline(task_name, manifest, work / "pipeline_baseline", "baseline")
        base = {
            "test": score(manifest, work / "pipeline_baseline"),
            "epochs": base_run["epochs_run"],
            "overfit_final_loss": base_run["overfit_final_loss"],
            "minutes": baseline_minutes,
            "budget": logged_budget(task_name, "baseline", base_run),
        }
    pipeline_scores = scores(manifest, work / "pipeline")
    result = {
        "dataset": name,
        "task": task_name,
        "metric": METRIC[task_name],
        "budget_s": budget_s,
        "pipeline": pipeline_scores["value"],
        "plain": score(manifest, work / "plain"),
        "max_dets": pipeline_scores.get("max_dets"),
        "pipeline_budget": logged_budget(task_name, "augmented", run),
        "pipeline_train_s": round(t_pipeline, 1),
        "pipeline_epochs": run["epochs_run"],
        "plain_train_s": plain_info["seconds"],
        "plain_epochs": plain_info["epochs"],
        "validate_s": round(t_validate, 1),
        "baseline": base,
        "splits": {s: len(v) for s, v in manifest["splits"].items()},
        "validation_notes": len(report["notes"]),
        "model": cfg.model.name + (f" ({cfg.model.weights})" if cfg.model.weights != "none" else ""),
        "image_size": cfg.image_size,
        "variant": variant,
        "init_kind": kind if from_init else None,
        "plain_settings": plain_settings,
        "seed": seed,
        "device": device_name(device),
        "cpu": cpu_name(),
        "work": str(work),
    }
    (work / "result.json").write_text(json.dumps(result, indent=2))
    return result


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return f"unknown CPU ({os.cpu_count()} cores)"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(device))} (torch {torch.__version__})"
    return cpu_name()


def budget_cells(b: dict) -> str:
    """Budget use (training seconds ÷ the time limit, as the run logged them) and the final learning rate beside the
    one the schedule ends at."""
    use = (
        f"{b['budget_use']:.3f} ({b['train_s']:.0f} of {b['limit_s']:.0f} s)"
        if b["budget_use"] is not None
        else "no limit"
    )
    end = f" (end {b['schedule_end_lr']:.1e})" if b["schedule_end_lr"] is not None else ""
    return f"{use} | {b['final_lr']:.1e}{end}"


def row(r: dict) -> str:
    ahead = "yes" if r["pipeline"] > r["plain"] else "no"
    base = (
        f" | {r['baseline']['test']:.3f} ({r['baseline']['epochs']} ep, {r['baseline']['minutes']:g} min; "
        f"{budget_cells(r['baseline']['budget']).replace(' | ', ', lr ')})"
        if r["baseline"]
        else ""
    )
    metric = r["metric"] + (f" (maxDets {r['max_dets']})" if r.get("max_dets") else "")
    return (
        f"| {r['dataset']} | {r['task']} | {r['model']} {r['image_size']} | {r['budget_s'] / 60:g} min | "
        f"{r['splits']['train']}/{r['splits']['val']}/{r['splits']['test']} | {metric} | "
        f"**{r['pipeline']:.3f}** ({r['pipeline_epochs']} of {r['pipeline_budget']['epochs_planned']} planned ep) | "
        f"{budget_cells(r['pipeline_budget'])} | {r['plain']:.3f} ({r['plain_epochs']} ep) | {ahead}{base} |"
    )


def main() -> None:
    from tasks.cli import parse_overrides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=[*DATASETS, "all"])
    ap.add_argument("--shared", default=str(REPO.parent / "shared" / "datasets"), help="folder holding the datasets")
    ap.add_argument("--budget-minutes", type=float, help="training wall time of each side (default: the overlay's)")
    ap.add_argument(
        "--variant",
        help="the overlay benchmarks/real_data/<dataset>_<variant>.yaml instead of <dataset>.yaml "
        "(e.g. pretrained: ImageNet weights on both sides)",
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--keep", help="folder to keep each dataset's work folder in (default: temporary folders)")
    ap.add_argument(
        "--baseline-minutes",
        type=float,
        default=0.0,
        help="afterwards, also the pipeline's baseline stage (overfit check, no augmentation) for this long",
    )
    ap.add_argument(
        "--seed",
        type=int,
        help="training seed of both sides (default: params.yaml's seed and the plain "
        "script's 0); the split does not move",
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where both sides train (default cpu)")
    ap.add_argument(
        "--plain",
        dest="plain_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the plain script (the overlay's plain: block), e.g. size=640",
    )
    ap.add_argument(
        "--from-init",
        action="store_true",
        help="the pipeline's settings from `python -m tasks init` at the overlay's budget, not the overlay",
    )
    ap.add_argument(
        "--kind",
        choices=["photos", "street", "microscopy", "documents"],
        help="with --from-init: init's --kind (the kind of data a user would name, e.g. microscopy for blood smears)",
    )
    args = ap.parse_args()
    if args.kind and not args.from_init:
        ap.error("--kind is init's: use it with --from-init")
    root = Path(args.shared).resolve()
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    names = list(DATASETS) if args.dataset == "all" else [args.dataset]
    rows = []
    for name in names:
        if not (root / name).is_dir():
            raise SystemExit(f"{name} not found under {root} (--shared)")
        here = Path.cwd()
        r = benchmark(
            name,
            root,
            args.budget_minutes,
            parse_overrides(args.overrides),
            args.keep,
            args.baseline_minutes,
            args.seed,
            args.device,
            parse_overrides(args.plain_overrides),
            args.from_init,
            args.variant,
            args.kind,
        )
        os.chdir(here)
        rows.append(row(r))
        print(json.dumps(r, indent=2))
    print(f"\nCPU: {cpu_name()}; each side one torch thread, both at once; trained on {device_name(args.device)}\n")
    extra = " pipeline baseline stage |" if args.baseline_minutes > 0 else ""
    print(
        "| dataset | task | pipeline model, size | budget | train/val/test | test metric | pipeline | pipeline budget use "
        "(training s ÷ time limit) | pipeline final lr | plain script | ahead |" + extra
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if extra else ""))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
