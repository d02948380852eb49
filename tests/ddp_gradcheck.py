"""Run by tests/test_distributed.py under ``torchrun --nproc-per-node 2``: one training step through
the pipeline's DDP wrapping (tasks.training.accelerate) on a fixed global batch split across the ranks; rank 0
compares the averaged DDP gradient with the gradient one process computes on the whole batch.

    torchrun --nproc-per-node 2 tests/ddp_gradcheck.py <task> <params.yaml> <result.json>

BatchNorm's batch statistics differ between a half batch and the whole batch, so its layers are frozen
(FrozenBatchNorm2d, running statistics) for the check. Detection's losses are normalised by the sampled
anchors and proposals of the whole batch; the samplers are set to take every candidate and the two
images carry the same number of boxes, so each image weighs the same in both runs."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from cv_models import get_task
from tasks.config import load_params
from tasks.training import accelerate


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach()), frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean), frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def deterministic_sampling(model: nn.Module) -> None:
    """Every anchor is foreground or background (no ignored band) and all of them are sampled; a fixed
    number of proposals per image (no NMS suppression), all sampled: no random subsets."""
    rpn, roi = model.rpn, model.roi_heads
    rpn.proposal_matcher.low_threshold = rpn.proposal_matcher.high_threshold
    rpn.fg_bg_sampler.batch_size_per_image = 10**9
    rpn.nms_thresh = 1.0
    rpn._post_nms_top_n["training"] = 20
    roi.fg_bg_sampler.batch_size_per_image = 10**9


def global_batch(task, name: str, n: int):
    data = task.dataset("train", task.eval_transforms(None))
    if name == "detection":  # two images with the same number of boxes
        by_count: dict[int, list[int]] = {}
        for i, r in enumerate(data.records):
            by_count.setdefault(len(r["boxes"]), []).append(i)
        idx = next(v for v in by_count.values() if len(v) >= n)[:n]
    else:
        idx = list(range(n))
    return task.collate([data[i] for i in idx])


def split(batch, rank: int, world: int):
    images, targets = batch
    k = len(images) // world
    sl = slice(rank * k, (rank + 1) * k)
    return images[sl], targets[sl]


def main() -> None:
    name, params_path, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    accelerate.init_from_env()
    rank, world = accelerate.rank(), accelerate.world_size()
    torch.manual_seed(0)  # the same initial weights on every rank (DDP would copy rank 0's anyway)
    task = get_task(name, load_params(params_path).task(name))
    model = freeze_batchnorm(task.build_model())
    if name == "detection":
        deterministic_sampling(model)
    reference = copy.deepcopy(model)
    n = 2 if name == "detection" else 8
    batch = global_batch(task, name, n)

    acc = accelerate.Accelerator(torch.device("cpu"))
    ddp = acc.prepare(model)  # the pipeline's own wrapping: DistributedDataParallel under torchrun
    assert isinstance(ddp, nn.parallel.DistributedDataParallel)
    ddp.train()
    images, targets = split(batch, rank, world)
    task.training_loss(ddp, images, targets).backward()  # DDP all-reduces (averages) the gradients

    if rank == 0:
        reference.train()
        task.training_loss(reference, *batch).backward()
        diffs, scale = [], []
        for (pname, p), q in zip(model.named_parameters(), reference.parameters()):
            if q.grad is None:
                continue
            diffs.append((p.grad - q.grad).abs().max().item())
            scale.append(q.grad.abs().max().item())
        out.write_text(
            json.dumps(
                {
                    "max_abs_diff": max(diffs),
                    "max_abs_grad": max(scale),
                    "n_params": len(diffs),
                    "world": world,
                    "local_batch": len(images),
                    "global_batch": len(batch[0]),
                }
            )
        )
    accelerate.shutdown()


if __name__ == "__main__":
    main()
