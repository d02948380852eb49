"""Training-loop overhead of the pipeline against a bare PyTorch loop (detection).

Both train the same detector (params.yaml's detection model) on the same images (the first
``--images`` of the train split) for the same epochs, threads, batch size, optimiser and schedule,
and both score the validation split with pycocotools after every epoch. The bare loop reads the
files with PIL, resizes image and boxes by hand and calls the model directly, so the difference
is the pipeline's machinery: transforms v2 with tv_tensors, the task's collate and loss, the
progress bar, checkpoints and best-model tracking. Prints the median time of each over
alternating repeats and the ratio (target: at most 1.05).

    python -m tasks generate   # once, for the synthetic scenes
    python benchmarks/bench_detection_step.py [--epochs 2] [--repeats 3] [--images 96]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from bare_loop import run_bare_loop
from cv_models import get_task
from tasks.training import engine
from tasks.config import load_params
from tasks.training.seeding import seed_everything


class BareDetection(Dataset):
    def __init__(self, records, size):
        self.records, self.size = records, size

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        with Image.open(r["path"]) as im:
            im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div_(255)
        scale = torch.tensor([self.size / r["width"], self.size / r["height"]] * 2)
        return x, {"boxes": r["boxes"] * scale, "labels": r["labels"], "image_id": r["image_id"]}


def _collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


def bare_loop(task, cfg, train_set, val_set, seed):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    seed_everything(seed)
    model = task.build_model()
    t = cfg.train
    loader = DataLoader(
        train_set,
        batch_size=t.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=_collate,
        generator=torch.Generator().manual_seed(seed),
    )
    val_loader = DataLoader(val_set, batch_size=t.eval_batch_size, collate_fn=_collate)
    opt = engine.build_optimizer(model, t.optimizer)
    sched = engine.build_scheduler(opt, t, len(loader))
    gt = COCO()
    with contextlib.redirect_stdout(io.StringIO()):
        gt.dataset = task.dataset("val", None).coco_ground_truth()
        gt.createIndex()

    def validate(model, val_loader):
        results = []
        for images, targets in val_loader:
            for out, tg in zip(model(images), targets):
                r = val_set.records[tg["image_id"] - 1]
                b = out["boxes"] * torch.tensor([r["width"] / cfg.image_size, r["height"] / cfg.image_size] * 2)
                results += [
                    {
                        "image_id": tg["image_id"],
                        "category_id": int(lab),
                        "score": float(s),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                    }
                    for (x0, y0, x1, y1), s, lab in zip(b.tolist(), out["scores"].tolist(), out["labels"].tolist())
                ]
        if results:
            with contextlib.redirect_stdout(io.StringIO()):
                ev = COCOeval(gt, gt.loadRes(results), "bbox")
                ev.evaluate()
                ev.accumulate()
                ev.summarize()

    def loss_of(model, images, targets):
        return sum(model(images, targets).values())

    return run_bare_loop(model, loader, val_loader, opt, sched, t.epochs, loss_of, validate)[0]


def pipeline_loop(task, cfg, train_set, val_set, seed, out: Path):
    seed_everything(seed)
    model = task.build_model()
    start = time.perf_counter()
    engine.fit(task, model, train_set, val_set, cfg.train, seed, out / "model.pt", out / "last.pt", desc="bench")
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=96, help="train images used (the first N of the split)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # normalisation 'none' so the benchmark needs no normstats output (the detector normalises inside either way)
    params = load_params(
        args.params,
        {
            "tasks.detection.train.epochs": args.epochs,
            "tasks.detection.train.num_threads": args.threads,
            "tasks.detection.normalization": "none",
        },
    )
    cfg = params.task("detection")
    task = get_task("detection", cfg)
    if not Path(cfg.data.path).exists():
        raise SystemExit(f"{cfg.data.path} is missing: run `python -m tasks generate` (or dvc repro generate) first")
    train = task.dataset("train", task.train_transforms(None, None))
    val = task.dataset("val", task.eval_transforms(None))
    n = min(args.images, len(train))
    train_sub = Subset(train, range(n))
    bare_train = Subset(BareDetection(train.records, cfg.image_size), range(n))
    bare_val = BareDetection(val.records, cfg.image_size)
    times = {"pipeline": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # alternate, so machine noise hits both alike
            times["bare"].append(bare_loop(task, cfg, bare_train, bare_val, params.seed))
            times["pipeline"].append(pipeline_loop(task, cfg, train_sub, val, params.seed, Path(tmp) / str(r)))
            print(f"repeat {r + 1}: bare {times['bare'][-1]:.2f}s  pipeline {times['pipeline'][-1]:.2f}s", flush=True)
    bare, pipe = statistics.median(times["bare"]), statistics.median(times["pipeline"])
    print(
        f"\ndetection, {n} train images, {len(val)} val images, {args.epochs} epochs, {args.threads} threads, "
        f"batch {cfg.train.batch_size}, model {cfg.model.name} ({getattr(cfg.model.options, 'backbone', '-')}), {cfg.image_size}px"
    )
    print(f"median bare PyTorch loop: {bare:.2f}s   median pipeline (tasks.training.engine.fit): {pipe:.2f}s")
    print(f"ratio pipeline / bare = {pipe / bare:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
