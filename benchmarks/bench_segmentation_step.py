"""Training speed of the pipeline's loop (tasks.training.engine.fit on the segmentation task) against a bare
PyTorch loop on the same model, data, transforms, loss, optimiser, schedule, epochs and threads.

    PYTHONPATH=. python benchmarks/bench_segmentation_step.py [--epochs 3] [--rounds 3] [--params params.yaml]

Both sides train from the same initial weights and run one validation pass per epoch (the pipeline
needs it to keep the best checkpoint). Rounds alternate pipeline / bare and the fastest of each is
kept, which damps the noise of a shared machine. Prints seconds per training step and the ratio
(target: at most 1.05). Uses params.yaml's segmentation data; generates the shapes data if absent.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bare_loop import run_bare_loop  # noqa: E402
from cv_models import get_task  # noqa: E402
from cv_models.normalize import Normalize, RunningStats  # noqa: E402
from cv_models.seg_losses import get_loss  # noqa: E402
from cv_models.segmentation import confusion, model_outputs  # noqa: E402
from tasks.training import engine  # noqa: E402
from tasks.config import load_params  # noqa: E402


def normalizer(task) -> Normalize:
    stats = RunningStats()
    for image, _ in task.dataset("train", task.eval_transforms(None)):
        stats.update(image.as_subclass(torch.Tensor))
    r = stats.result()
    return Normalize("per_channel_std", torch.tensor(r["per_channel_mean"]), torch.tensor(r["per_channel_std"]))


def bare_loop(task, model, train, val, cfg, seed: int) -> float:
    """What one would write by hand: DataLoader, forward, loss, backward, step; argmax on val."""
    torch.manual_seed(seed)
    loader = DataLoader(
        train,
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=task.collate,
        drop_last=len(train) > cfg.batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    val_loader = DataLoader(val, batch_size=cfg.eval_batch_size, collate_fn=task.collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.optimizer.lr, total_steps=cfg.epochs * len(loader), pct_start=0.3
    )
    loss_fn, n = get_loss(cfg.loss.name), len(task.class_names())

    def loss_of(model, images, masks):
        return loss_fn(model_outputs(model(images))[0], masks, cfg.loss)

    def validate(model, val_loader):
        cm = torch.zeros(n, n, dtype=torch.long)
        for images, masks in val_loader:
            cm += confusion(model_outputs(model(images))[0].argmax(1), masks, n, cfg.loss.ignore_index)
        return cm

    return run_bare_loop(model, loader, val_loader, optimizer, scheduler, cfg.epochs, loss_of, validate)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    t = "tasks.segmentation.train."
    params = load_params(
        args.params,
        {
            t + "epochs": args.epochs,
            t + "num_threads": args.threads,
            t + "device": "cpu",
            t + "scheduler": {"name": "onecycle", "warmup_epochs": 0},
            t + "optimizer.name": "adamw",
        },
    )
    cfg = params.task("segmentation")
    if not Path(cfg.data.path).exists():
        from cv_models.data import shapes

        print(f"generating the shapes data into {params.shapes.out_dir}")
        shapes.generate(params.shapes.out_dir, params.shapes)
    task = get_task("segmentation", cfg)
    torch.set_num_threads(args.threads)
    norm = normalizer(task)
    train = task.dataset("train", task.train_transforms(None, norm))
    val = task.dataset("val", task.eval_transforms(norm))
    for data in (train, val):  # read every mask once so neither side pays for the first read
        [data.mask(i) for i in range(len(data))]
    torch.manual_seed(params.seed)
    initial = task.build_model()
    steps = args.epochs * (len(train) // cfg.train.batch_size if len(train) > cfg.train.batch_size else 1)
    print(
        f"segmentation: {cfg.model.name} width {cfg.model.width} depth {cfg.model.depth}, {len(train)} train images "
        f"at {cfg.image_size} px, batch {cfg.train.batch_size}, loss {cfg.train.loss.name}, {args.epochs} epochs "
        f"= {steps} steps, {args.threads} thread(s), best of {args.rounds} rounds"
    )
    pipeline, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            fit = engine.fit(
                task,
                copy.deepcopy(initial),
                train,
                val,
                cfg.train,
                params.seed,
                Path(tmp) / "model.pt",
                checkpoint_path=Path(tmp) / "last.pt",
                desc="bench",
            )
            pipeline.append(fit.seconds)
            bare.append(bare_loop(task, copy.deepcopy(initial), train, val, cfg.train, params.seed))
            print(f"round {r + 1}: pipeline {pipeline[-1]:.2f}s  bare {bare[-1]:.2f}s")
    p, b = min(pipeline), min(bare)
    print(f"pipeline: {p / steps * 1000:.1f} ms/step   bare PyTorch: {b / steps * 1000:.1f} ms/step")
    print(f"ratio pipeline/bare = {p / b:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
