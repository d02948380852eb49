"""BCCD blood cells through the pipeline within a wall-time budget (default 10 minutes, all of it):
validate (the two zero-size boxes are dropped and named), a backbone pretrained on crops of the train
split's cells, normstats, the augmented detector stage, and the test split scored with pycocotools.
Settings: benchmarks/bccd.yaml on top of params.yaml; change one with --set key=value.

    python benchmarks/bccd_detection.py [--pretrain crops|shapes|none] [--budget-minutes 10] [--set k=v ...] [--keep DIR]

--pretrain shapes: the main job's pretraining (resnet18 on the embedded synthetic shapes);
--pretrain none: the backbone starts from random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# Ultralytics YOLOv8n from random initialisation, 320 px, on this machine (the reference)
YOLOV8N = {"map50": 0.517, "map": 0.305, "seconds": 588}
EVAL_ALLOWANCE_S = 45  # scoring the test split after training, kept out of the training's time limit


def bccd_overrides(root: Path, pretrain: str = "crops", extra: dict | None = None) -> dict:
    """benchmarks/bccd.yaml pointed at ``root``, the pretraining choice, then ``extra`` on top."""
    overrides = yaml.safe_load((REPO / "benchmarks" / "bccd.yaml").read_text())
    overrides["tasks.detection.data.path"] = str(root)
    if pretrain == "shapes":  # params.yaml's own pretraining section, on the generated shapes
        overrides = {k: v for k, v in overrides.items() if not k.startswith("pretrain.")}
        overrides["tasks.detection.model.options.backbone_weights"] = "models/pretrain/backbone.pt"
    elif pretrain == "none":
        overrides["tasks.detection.model.options.backbone_weights"] = "none"
    return {**overrides, **(extra or {})}


def main():
    from tasks.cli import parse_overrides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bccd", default=str(REPO / ".." / "shared" / "datasets" / "bccd" / "BCCD"))
    ap.add_argument("--pretrain", choices=("crops", "shapes", "none"), default="crops")
    ap.add_argument(
        "--budget-minutes", type=float, default=10.0, help="wall time for everything; training stops in time"
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--keep", help="folder to keep the outputs in (default: a temporary one)")
    args = ap.parse_args()
    root = Path(args.bccd).resolve()
    if not (root / "Annotations").is_dir():
        raise SystemExit(f"BCCD not found at {root} (expected Annotations/, JPEGImages/, ImageSets/Main/)")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("CV_PIPELINE_RUN_ID", "bccd-benchmark")
    work = Path(args.keep or tempfile.mkdtemp(prefix="bccd-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    os.chdir(work)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    from cv_models import get_task
    from tasks import augmented, crops, generate, normstats, pretrain, validate
    from tasks.config import load_params
    from tasks.paths import models
    from tasks.training import engine

    overrides = bccd_overrides(root, args.pretrain, parse_overrides(args.overrides))
    t0 = time.perf_counter()
    times = {}

    def timed(name, fn, *a):
        start = time.perf_counter()
        out = fn(*a)
        times[name] = time.perf_counter() - start
        return out

    report = timed("validate", validate.run, "detection", "params.yaml", overrides)
    print("\n".join(n for n in report["notes"] if n.startswith("dropped")))
    if args.pretrain == "crops":
        timed("crops", crops.run, "params.yaml", overrides)
    elif args.pretrain == "shapes":
        timed("generate", generate.run, "params.yaml", overrides)
    if args.pretrain != "none":
        timed("pretrain", pretrain.run, "params.yaml", overrides)
    timed("normstats", normstats.run, "detection", "params.yaml", overrides)
    left = args.budget_minutes * 60 - (time.perf_counter() - t0) - EVAL_ALLOWANCE_S
    overrides["tasks.detection.train.time_limit_minutes"] = max(left, 1.0) / 60
    run = timed("train", augmented.run, "detection", "params.yaml", overrides)

    start = time.perf_counter()
    cfg = load_params("params.yaml", overrides).task("detection")
    task = get_task("detection", cfg)
    test = task.dataset("test", task.eval_transforms(None))
    loader = engine.make_loader(task, test, cfg.train.eval_batch_size, False, 0)
    device = engine.pick_device(cfg.train.device)
    model = engine.load_model(task, models("detection", "augmented") / "model.pt").to(device)
    result = task.evaluate(model, loader, device, native=True)
    m = result.metrics
    details = work / "details"  # per-image results in the original pixels, rescorable with pycocotools (RECOMPUTE.md)
    details.mkdir(exist_ok=True)
    task.report({"augmented": result}, test, details)
    times["test"] = time.perf_counter() - start
    total = time.perf_counter() - t0

    print(
        f"\nBCCD, {cfg.model.name} + {cfg.model.options.backbone} (pretrain: {args.pretrain}), {cfg.image_size}px, "
        f"{run['epochs_run']} of {run['epochs']} epochs (best {run['best_epoch']}); outputs in {work}, the test "
        f"split's boxes and ground truth in {details} (RECOMPUTE.md)"
    )
    print("| model | test mAP@.5 | test mAP@[.5:.95] | wall time |")
    print("|---|---|---|---|")
    print(f"| this pipeline | {m['map50']:.3f} | {m['map']:.3f} | {total:.0f} s |")
    print(
        f"| YOLOv8n, random init, 320 px (reference) | {YOLOV8N['map50']:.3f} | {YOLOV8N['map']:.3f} | {YOLOV8N['seconds']} s |"
    )
    print(
        "per class AP@.5: "
        + json.dumps({k.split("/", 1)[1]: round(v, 3) for k, v in m.items() if k.startswith("ap50/")})
    )
    print("seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    within = total <= args.budget_minutes * 60
    print(f"whole run {total:.0f} s: {'within' if within else 'OVER'} the {args.budget_minutes:g}-minute budget")
    (work / "bccd_result.json").write_text(
        json.dumps(
            {"test": m, "seconds": times, "total_seconds": total, "pretrain": args.pretrain, "run": run},
            indent=2,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
