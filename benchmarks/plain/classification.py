"""Plain torchvision classification: a torchvision classifier from random init, images preloaded at
size x size, Adam at a fixed learning rate, cross-entropy; the last weights predict the test split.
With ``pretrained: timm:<arch>`` in its settings: that timm classifier from the same ImageNet weights the pipeline
resolves (cv_models/weights.py), normalised as those weights expect; the rest of the loop stays plain."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from common import batches, finish, load_rgb, parse_args, to_tensor, train_within  # noqa: E402

MEAN, STD = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def build(s: dict, n: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The classifier and its input mean and std: torchvision's from random init, or a pretrained timm one."""
    if not s.get("pretrained"):
        return getattr(torchvision.models, s["model"])(num_classes=n), MEAN, STD
    import timm

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: its weights resolver
    from cv_models.weights import load_pretrained, resolve_imagenet

    name = s["pretrained"]
    model = timm.create_model(name.split(":", 1)[1], num_classes=n)
    resolved = resolve_imagenet(name)
    load_pretrained(model, resolved, head_prefixes=("classifier.",))
    c = resolved.convention
    return model, torch.tensor(c.mean)[:, None, None], torch.tensor(c.std)[:, None, None]


def main() -> None:
    args = parse_args()
    s, m = args.settings, args.manifest
    size, names = s["size"], m["classes"]
    train = m["splits"]["train"]
    model, mean, std = build(s, len(names))
    x = torch.stack([(to_tensor(load_rgb(it["path"]), size) - mean) / std for it in train])
    y = torch.tensor([it["label"] for it in train])
    x, y = x.to(args.device), y.to(args.device)
    model = model.to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=s["lr"])

    def epoch(k: int) -> float:
        model.train()
        losses = []
        for idx in batches(len(x), s["batch_size"], k, s["seed"]):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return sum(losses) / len(losses)

    info = train_within(args.budget_seconds, epoch)
    model.eval()
    rows = []
    with torch.no_grad():
        for it in m["splits"]["test"]:
            logits = model(((to_tensor(load_rgb(it["path"]), size) - mean) / std)[None].to(args.device))
            rows.append({"file": it["path"], "class": names[int(logits.argmax())]})
    pd.DataFrame(rows).to_csv(Path(args.out) / "predictions.csv", index=False)
    finish(args.out, info)


if __name__ == "__main__":
    main()
