"""Plain torchvision detection, after the torchvision object-detection tutorial: Faster R-CNN (or
Mask R-CNN with --masks) on a resnet FPN backbone from random init, images preloaded at size x size,
random horizontal flip, SGD(lr, momentum 0.9, weight decay 5e-4) with the tutorial's warmup over the
first epoch; results on the test split in the image's own pixels as COCO results.
With ``pretrained: timm:<arch>`` in its settings: the pipeline's FPN over that timm encoder (strides 8-32) from the
ImageNet weights the pipeline resolves, normalised as they expect; anchors and RoI pooling for its four levels."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from pycocotools import mask as mask_utils
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

sys.path.insert(0, str(Path(__file__).parent))
from common import batches, finish, load_rgb, parse_args, to_tensor, train_within  # noqa: E402


def load_split(items: list[dict], size: int, masks: bool) -> list[tuple[torch.Tensor, dict]]:
    out = []
    for it in items:
        image = load_rgb(it["path"])
        sx, sy = size / image.width, size / image.height
        keep = [k for k, c in enumerate(it.get("iscrowd") or [0] * len(it["labels"])) if c == 0]
        boxes = torch.tensor([it["boxes"][k] for k in keep], dtype=torch.float32).reshape(-1, 4) * torch.tensor(
            [sx, sy, sx, sy]
        )
        target = {"boxes": boxes, "labels": torch.tensor([it["labels"][k] for k in keep], dtype=torch.int64)}
        if masks:
            m = [
                mask_utils.decode({"size": it["masks"][k]["size"], "counts": it["masks"][k]["counts"].encode()})
                for k in keep
            ]
            target["masks"] = (
                (
                    F.interpolate(torch.from_numpy(np.stack(m)).float()[None], size=(size, size), mode="nearest")[0]
                    > 0.5
                ).to(torch.uint8)
                if m
                else torch.zeros((0, size, size), dtype=torch.uint8)
            )
        out.append((to_tensor(image, size), target))
    return out


def flip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    w = image.shape[-1]
    t = dict(target)
    sign, shift = torch.tensor([-1, 1, -1, 1], device=image.device), torch.tensor([w, 0, w, 0], device=image.device)
    t["boxes"] = target["boxes"][:, [2, 1, 0, 3]] * sign + shift
    if "masks" in t:
        t["masks"] = target["masks"].flip(-1)
    return image.flip(-1), t


def build_backbone(s: dict) -> tuple[torch.nn.Module, dict]:
    """The tutorial's resnet FPN backbone from random init, or the pipeline's FPN over a pretrained timm encoder
    (three levels plus the pooled one: anchors 32 to 256 and RoI pooling on the three, as torchvision's resnet FPN
    has them on its five and four), with the weights' own input mean and std."""
    if not s.get("pretrained"):
        return resnet_fpn_backbone(backbone_name=s["backbone"], weights=None, trainable_layers=5), {}
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: its backbones and resolver
    from cv_models.nets.detectors import get_backbone, pretrained_trunk
    from cv_models.weights import load_pretrained, resolve_imagenet

    backbone = get_backbone(s["pretrained"])(16, s.get("fpn_channels", 256), "none")
    resolved = resolve_imagenet(s["pretrained"])
    load_pretrained(pretrained_trunk(backbone), resolved)
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 4)
    return backbone, {
        "rpn_anchor_generator": anchors,
        "box_roi_pool": MultiScaleRoIAlign(["0", "1", "2"], 7, 2),
        "image_mean": list(resolved.convention.mean),
        "image_std": list(resolved.convention.std),
        **({"mask_roi_pool": MultiScaleRoIAlign(["0", "1", "2"], 14, 2)} if s.get("masks") else {}),
    }


def main() -> None:
    args = parse_args()
    s, m = args.settings, args.manifest
    size, masks = s["size"], bool(s.get("masks"))
    dev = args.device
    train = [
        (x.to(dev), {k: v.to(dev) for k, v in t.items()}) for x, t in load_split(m["splits"]["train"], size, masks)
    ]
    backbone, extra = build_backbone(s)
    kind = torchvision.models.detection.MaskRCNN if masks else torchvision.models.detection.FasterRCNN
    model = kind(
        backbone,
        num_classes=len(m["classes"]) + 1,
        min_size=size,
        max_size=size,
        box_detections_per_img=s.get("detections_per_img", 100),
        **extra,
    ).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=s["lr"], momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = max(len(train) // s["batch_size"], 1)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, total_iters=min(1000, steps_per_epoch - 1) or 1)
    gen = torch.Generator().manual_seed(s["seed"])

    def epoch(k: int) -> float:
        model.train()
        losses = []
        for idx in batches(len(train), s["batch_size"], k, s["seed"]):
            pairs = [flip(*train[i]) if torch.rand(1, generator=gen) < 0.5 else train[i] for i in idx]
            loss = sum(model([p[0] for p in pairs], [p[1] for p in pairs]).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if k == 0:
                warmup.step()
            losses.append(loss.item())
        return sum(losses) / len(losses)

    info = train_within(args.budget_seconds, epoch)
    model.eval()
    results = []
    with torch.no_grad():
        for image_id, it in enumerate(m["splits"]["test"], start=1):
            image = load_rgb(it["path"])
            out = {k: v.cpu() for k, v in model([to_tensor(image, size).to(dev)])[0].items()}
            sx, sy = image.width / size, image.height / size
            boxes = out["boxes"] * torch.tensor([sx, sy, sx, sy])
            if masks and len(out["masks"]):
                full = F.interpolate(
                    out["masks"], size=(image.height, image.width), mode="bilinear", align_corners=False
                )
            for k, ((x0, y0, x1, y1), score, label) in enumerate(
                zip(boxes.tolist(), out["scores"].tolist(), out["labels"].tolist())
            ):
                r = {
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(score),
                }
                if masks:
                    rle = mask_utils.encode(np.asfortranarray((full[k, 0] > 0.5).numpy().astype(np.uint8)))
                    r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
                results.append(r)
    (Path(args.out) / "coco_results.json").write_text(json.dumps(results))
    finish(args.out, info)


if __name__ == "__main__":
    main()
