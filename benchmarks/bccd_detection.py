"""BCCD blood cells (Pascal VOC, 364 images, 3 classes) through the detection pipeline with only
params changed: validate (the two zero-size boxes are dropped and named), normstats, baseline,
augmented and evaluate, in a scratch folder. Prints test mAP@.5 / mAP@[.5:.95] and the time per epoch.

    python benchmarks/bccd_detection.py [--bccd ../shared/datasets/bccd/BCCD] [--epochs 8] [--image-size 256]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bccd_overrides(root: Path, image_size: int, epochs: int, model: str) -> dict:
    """The params that point the detection task at BCCD (everything else as in params.yaml)."""
    return {
        "tasks.detection.data.format": "voc",
        "tasks.detection.data.path": str(root),
        "tasks.detection.data.classes": ["RBC", "WBC", "Platelets"],
        "tasks.detection.data.options": {"annotations": "Annotations", "images": "JPEGImages",
                                         "split_files": "ImageSets/Main/{split}.txt", "invalid_boxes": "drop"},
        "tasks.detection.image_size": image_size,
        "tasks.detection.model.name": model,
        "tasks.detection.model.options.anchor_size": 16,
        "tasks.detection.model.options.detections_per_img": 100,
        "tasks.detection.train.epochs": epochs,
        "tasks.detection.overfit_check.enabled": False,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bccd", default=str(REPO / ".." / "shared" / "datasets" / "bccd" / "BCCD"))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--model", default="fasterrcnn")
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
    from tasks import augmented, baseline, evaluate, normstats, validate

    overrides = bccd_overrides(root, args.image_size, args.epochs, args.model)
    t0 = time.perf_counter()
    report = validate.run("detection", "params.yaml", overrides)
    print("\n".join(n for n in report["notes"] if n.startswith("dropped")))
    normstats.run("detection", "params.yaml", overrides)
    runs = {name: stage.run("detection", "params.yaml", overrides) for name, stage in
            (("baseline", baseline), ("augmented", augmented))}
    test = evaluate.run("detection", "params.yaml", overrides)
    total = time.perf_counter() - t0
    print(f"\nBCCD ({report['n_samples']} images), {args.model}, {args.image_size}px, {args.epochs} epochs, outputs in {work}")
    print("| model | test mAP@.5 | test mAP@[.5:.95] | time per epoch |")
    print("|---|---|---|---|")
    for name in ("dummy", "baseline", "augmented"):
        per_epoch = f"{runs[name]['train_seconds'] / runs[name]['epochs']:.1f} s" if name in runs else "-"
        print(f"| {name} | {test[name]['map50']:.4f} | {test[name]['map']:.4f} | {per_epoch} |")
    print(f"per class AP@.5 (augmented): " + json.dumps({k.split('/', 1)[1]: round(v, 4) for k, v in test['augmented'].items()
                                                        if k.startswith('ap50/')}))
    print(f"whole run: {total:.0f} s")


if __name__ == "__main__":
    main()
