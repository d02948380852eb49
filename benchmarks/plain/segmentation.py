"""Plain U-Net segmentation: the textbook U-Net (two 3x3 conv-BN-ReLU per level, max-pool down,
ConvTranspose up, skip concatenation) from random init, images and masks preloaded at size x size,
Adam, cross-entropy; test logits resized back to each image's own size, then argmax.
With ``pretrained: timm:<arch>`` in its settings: the same U-Net decoder on that timm encoder from the ImageNet
weights the pipeline resolves (cv_models/nets/timm_unet.py, cv_models/weights.py), normalised as those weights
expect; the loop stays plain."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import batches, finish, load_rgb, parse_args, to_tensor, train_within  # noqa: E402


def block(a: int, b: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(a, b, 3, padding=1),
        nn.BatchNorm2d(b),
        nn.ReLU(inplace=True),
        nn.Conv2d(b, b, 3, padding=1),
        nn.BatchNorm2d(b),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, classes: int, width: int, depth: int):
        super().__init__()
        w = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([block(3, w[0])] + [block(w[i], w[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in reversed(range(depth))])
        self.dec = nn.ModuleList([block(2 * w[i], w[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(w[0], classes, 1)

    def forward(self, x):
        skips = []
        for k, blk in enumerate(self.down):
            x = blk(x if k == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1])):
            x = dec(torch.cat([up(x), skip], 1))
        return self.head(x)


def build(s: dict, n: int, mean: torch.Tensor, std: torch.Tensor) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The textbook U-Net from random init (the data's mean and std), or the U-Net decoder on a pretrained timm
    encoder (the weights' own mean and std)."""
    if not s.get("pretrained"):
        return UNet(n, s["width"], s["depth"]), mean, std
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: its encoder U-Net and resolver
    from cv_models.nets.timm_unet import encoder_unet
    from cv_models.weights import load_pretrained, resolve_imagenet

    model = encoder_unet(s["pretrained"], n, width=s["width"])
    resolved = resolve_imagenet(s["pretrained"])
    load_pretrained(model.encoder, resolved)
    c = resolved.convention
    return model, torch.tensor(c.mean)[:, None, None], torch.tensor(c.std)[:, None, None]


def main() -> None:
    args = parse_args()
    s, m = args.settings, args.manifest
    size, n = s["size"], len(m["classes"])
    train = m["splits"]["train"]
    x = torch.stack([to_tensor(load_rgb(it["path"]), size) for it in train])
    mean, std = x.mean((0, 2, 3))[:, None, None], x.std((0, 2, 3))[:, None, None]  # the train split's statistics
    model, mean, std = build(s, n, mean, std)
    x = (x - mean) / std
    y = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(it["mask"]).resize((size, size), Image.NEAREST)).astype(np.int64))
            for it in train
        ]
    )
    x, y = x.to(args.device), y.to(args.device)
    model = model.to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=s["lr"])

    def epoch(k: int) -> float:
        model.train()
        losses = []
        for idx in batches(len(x), s["batch_size"], k, s["seed"]):
            loss = F.cross_entropy(model(x[idx]), y[idx], ignore_index=255)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return sum(losses) / len(losses)

    info = train_within(args.budget_seconds, epoch)
    model.eval()
    out = Path(args.out)
    (out / "masks").mkdir(exist_ok=True)
    images = []
    with torch.no_grad():
        for i, it in enumerate(m["splits"]["test"], start=1):
            image = load_rgb(it["path"])
            logits = model(((to_tensor(image, size) - mean) / std)[None].to(args.device)).cpu()
            logits = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
            Image.fromarray(logits[0].argmax(0).numpy().astype(np.uint8)).save(out / "masks" / f"{i}.png")
            images.append({"id": i, "file_name": it["path"], "mask": f"masks/{i}.png"})
    (out / "images.json").write_text(json.dumps(images))
    finish(args.out, info)


if __name__ == "__main__":
    main()
