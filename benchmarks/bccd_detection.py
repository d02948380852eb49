"""BCCD blood cells through the detection pipeline, params changed only (benchmarks/bccd.yaml):
validate (the two zero-size boxes are dropped and named), normstats, the augmented stage (the best
configuration) and the test split scored with pycocotools. Prints test mAP@.5, mAP@[.5:.95], the
time per epoch and the wall time of the whole run.

    python benchmarks/bccd_detection.py [--bccd ../shared/datasets/bccd/BCCD] [--set key=value ...] [--keep DIR]
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


def bccd_overrides(root: Path, extra: dict | None = None) -> dict:
    """benchmarks/bccd.yaml pointed at ``root``, then ``extra`` on top."""
    overrides = yaml.safe_load((REPO / "benchmarks" / "bccd.yaml").read_text())
    overrides["tasks.detection.data.path"] = str(root)
    return {**overrides, **(extra or {})}


def main():
    from tasks.cli import parse_overrides

    ap = argparse.ArgumentParser()
    ap.add_argument("--bccd", default=str(REPO / ".." / "shared" / "datasets" / "bccd" / "BCCD"))
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
    from tasks import augmented, engine, normstats, validate
    from tasks.config import load_params
    from tasks.paths import models
    from tasks.train import normalizer
    from cv_models import get_task

    overrides = bccd_overrides(root, parse_overrides(args.overrides))
    t0 = time.perf_counter()
    report = validate.run("detection", "params.yaml", overrides)
    print("\n".join(n for n in report["notes"] if n.startswith("dropped")))
    normstats.run("detection", "params.yaml", overrides)
    t_train = time.perf_counter()
    run = augmented.run("detection", "params.yaml", overrides)
    t_train = time.perf_counter() - t_train
    cfg = load_params("params.yaml", overrides).task("detection")
    task = get_task("detection", cfg)
    test = task.dataset("test", task.eval_transforms(None))
    loader = engine.make_loader(task, test, cfg.train.eval_batch_size, False, 0)
    model = engine.load_model(task, models("detection", "augmented") / "model.pt")
    result = task.evaluate(model, loader, engine.pick_device(cfg.train.device))
    total = time.perf_counter() - t0
    m = result.metrics
    print(f"\nBCCD test ({len(test)} images): mAP@.5 {m['map50']:.4f}  mAP@[.5:.95] {m['map']:.4f}  "
          f"per class AP@.5 " + json.dumps({k.split('/', 1)[1]: round(v, 3) for k, v in m.items() if k.startswith('ap50/')}))
    print(f"training {t_train:.0f} s ({run['epochs']} epochs, best {run['best_epoch']}), whole run {total:.0f} s; outputs in {work}")


if __name__ == "__main__":
    main()
