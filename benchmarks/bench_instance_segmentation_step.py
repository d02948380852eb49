"""Training-loop overhead of the pipeline against a bare PyTorch loop (instance segmentation).

Both train the same Mask R-CNN (params.yaml's instance_segmentation model) on the same images (the
first ``--images`` of the train split) for the same epochs, threads, batch size, optimiser and
schedule, and both score the validation split's masks with pycocotools after every epoch. The bare
loop decodes the COCO masks with pycocotools, resizes image and masks by hand and calls the model
directly, so the difference is the pipeline's machinery: transforms v2 with tv_tensors (image,
boxes and masks together), the task's collate and loss, the progress bar, checkpoints and
best-model tracking. Prints the median wall time and the median process CPU time of each over
alternating repeats and their ratios (target: at most 1.05). On a shared machine the CPU-time ratio
is the steadier figure: other people's jobs stretch wall time but not the CPU work of the loop.

    python -m tasks generate   # once, for the synthetic scenes
    python benchmarks/bench_instance_segmentation_step.py [--epochs 2] [--repeats 3] [--images 64]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from bare_loop import run_bare_loop
from cv_models import get_task
from tasks.training import engine
from tasks.config import load_params
from tasks.training.seeding import seed_everything

TASK = "instance_segmentation"


class BareInstances(Dataset):
    """PIL + pycocotools + F.interpolate, nothing else."""

    def __init__(self, records, size):
        self.records, self.size = records, size

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        from pycocotools import mask as mask_utils

        r = self.records[i]
        with Image.open(r["path"]) as im:
            w, h = im.size
            im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div_(255)
        masks = []
        for inst in r["instances"]:
            seg = inst["segmentation"]
            rle = (
                mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
                if isinstance(seg, list)
                else {"size": seg["size"], "counts": seg["counts"].encode()}
            )
            masks.append(mask_utils.decode(rle))
        m = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
        m = F.interpolate(m[None].float(), size=(self.size, self.size), mode="nearest")[0].to(torch.uint8)
        keep = m.flatten(1).sum(1) > 0
        m = m[keep]
        boxes = torch.zeros((0, 4))
        if len(m):
            from torchvision.ops import masks_to_boxes

            boxes = masks_to_boxes(m) + torch.tensor([0.0, 0.0, 1.0, 1.0])
        labels = torch.tensor([inst["label"] for inst in r["instances"]], dtype=torch.int64)[keep]
        return x, {"boxes": boxes, "labels": labels, "masks": m, "image_id": r["image_id"]}


def _collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


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

    def loss_of(model, images, targets):
        return sum(model(images, [{k: v for k, v in tg.items() if k != "image_id"} for tg in targets]).values())

    def validate(model, val_loader):
        gt = {
            "images": [],
            "annotations": [],
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(task.class_names())],
        }
        results = []
        for images, targets in val_loader:
            for out, tg in zip(model(images), targets):
                gt["images"].append({"id": tg["image_id"], "width": cfg.image_size, "height": cfg.image_size})
                for m, b, lab in zip(tg["masks"].numpy(), tg["boxes"].tolist(), tg["labels"].tolist()):
                    gt["annotations"].append(
                        {
                            "id": len(gt["annotations"]) + 1,
                            "image_id": tg["image_id"],
                            "category_id": lab,
                            "segmentation": _rle(m),
                            "area": float(m.sum()),
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                            "iscrowd": 0,
                        }
                    )
                masks = (out["masks"][:, 0] > 0.5).numpy()
                results += [
                    {
                        "image_id": tg["image_id"],
                        "category_id": int(lab),
                        "score": float(s),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "segmentation": _rle(m),
                    }
                    for (x0, y0, x1, y1), s, lab, m in zip(
                        out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist(), masks
                    )
                ]
        if results:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_gt = COCO()
                coco_gt.dataset = json.loads(json.dumps(gt))
                coco_gt.createIndex()
                for iou_type in ("bbox", "segm"):
                    ev = COCOeval(coco_gt, coco_gt.loadRes(json.loads(json.dumps(results))), iou_type)
                    ev.evaluate()
                    ev.accumulate()
                    ev.summarize()

    return run_bare_loop(model, loader, val_loader, opt, sched, t.epochs, loss_of, validate)


def pipeline_loop(task, cfg, train_set, val_set, seed, out: Path):
    seed_everything(seed)
    model = task.build_model()
    start, cpu = time.perf_counter(), time.process_time()
    engine.fit(task, model, train_set, val_set, cfg.train, seed, out / "model.pt", out / "last.pt", desc="bench")
    return time.perf_counter() - start, time.process_time() - cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=64, help="train images used (the first N of the split)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # normalisation 'none': the benchmark needs no normstats output and the bare loop feeds [0, 1] pixels
    params = load_params(
        args.params,
        {
            f"tasks.{TASK}.train.epochs": args.epochs,
            f"tasks.{TASK}.train.num_threads": args.threads,
            f"tasks.{TASK}.normalization": "none",
        },
    )
    cfg = params.task(TASK)
    task = get_task(TASK, cfg)
    if cfg.data.format != "coco" or not Path(cfg.data.path).exists():
        raise SystemExit(f"{cfg.data.path}: needs the COCO scenes; run `python -m tasks generate` first")
    train = task.dataset("train", task.train_transforms(None, None))
    val = task.dataset("val", task.eval_transforms(None))
    n = min(args.images, len(train))
    train_sub = Subset(train, range(n))
    bare_train = Subset(BareInstances(train.records, cfg.image_size), range(n))
    bare_val = BareInstances(val.records, cfg.image_size)
    times = {"pipeline": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # alternate, so machine noise hits both alike
            times["bare"].append(bare_loop(task, cfg, bare_train, bare_val, params.seed))
            times["pipeline"].append(pipeline_loop(task, cfg, train_sub, val, params.seed, Path(tmp) / str(r)))
            (bw, bc), (pw, pc) = times["bare"][-1], times["pipeline"][-1]
            print(f"repeat {r + 1}: bare {bw:.2f}s (cpu {bc:.2f}s)  pipeline {pw:.2f}s (cpu {pc:.2f}s)", flush=True)
    bare, pipe = (statistics.median(w for w, _ in times["bare"]), statistics.median(w for w, _ in times["pipeline"]))
    bare_cpu, pipe_cpu = (
        statistics.median(c for _, c in times["bare"]),
        statistics.median(c for _, c in times["pipeline"]),
    )
    print(
        f"\n{TASK}, {n} train images, {len(val)} val images, {args.epochs} epochs, {args.threads} threads, "
        f"batch {cfg.train.batch_size}, model {cfg.model.name} ({getattr(cfg.model.options, 'backbone', '-')}), {cfg.image_size}px"
    )
    print(
        f"median bare PyTorch loop: {bare:.2f}s wall, {bare_cpu:.2f}s cpu   "
        f"median pipeline (tasks.training.engine.fit): {pipe:.2f}s wall, {pipe_cpu:.2f}s cpu"
    )
    print(f"ratio pipeline / bare = {pipe / bare:.3f} wall, {pipe_cpu / bare_cpu:.3f} cpu  (target <= 1.05)")


if __name__ == "__main__":
    main()
