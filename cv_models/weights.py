"""Initial weights: none, a local checkpoint file, or torchvision's named weights.

No download happens unless the user named torchvision weights; then a missing
network gives a clear error saying where to put the file instead.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class WeightsError(RuntimeError):
    pass


def read_checkpoint(path: str | Path, key: str = "model.weights") -> dict[str, torch.Tensor]:
    """A state dict from a file: a bare state dict or ``{"model": state_dict}`` (as this pipeline saves).
    ``key`` is the params.yaml setting that named the file (for the error message)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist ({key} in params.yaml; the pretrain stage writes "
                           f"pretrain.out)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling problem is a bad file
        raise WeightsError(f"weights file {path} could not be read as a torch checkpoint: {err}") from None
    state = blob.get("model", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} holds no state dict (expected a dict of tensors or {{'model': ...}})")
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, head_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Load matching tensors; head tensors of another shape are skipped (the head is re-fitted).

    Any other missing or unexpected key is an error naming those keys.
    Returns the names of the skipped head tensors.
    """
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape and k.startswith(head_prefixes)]
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape and k not in skipped]
    usable = {k: v for k, v in state.items() if k in own and k not in skipped and k not in mismatched}
    # a key of the wrong shape is listed once, as a shape mismatch, not again as missing
    missing = [k for k in own if k not in state and not k.startswith(head_prefixes)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or mismatched:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") if keys else "none"

        raise WeightsError(
            f"weights {source} do not fit model {type(model).__name__}: missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; shape mismatches: {show(mismatched)}"
        )
    model.load_state_dict(usable, strict=False)
    return skipped


def torchvision_state_dict(model_name: str, weights_name: str) -> dict[str, torch.Tensor]:
    """State dict of torchvision's named weights, from ``$TORCH_HOME/hub/checkpoints`` or the network."""
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(model_name)
    except (ValueError, KeyError):
        raise WeightsError(f"torchvision has no weights for model {model_name!r}") from None
    try:
        weights = enum[weights_name] if weights_name != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise WeightsError(
            f"{enum.__name__} has no member {weights_name!r}; choose one of {[w.name for w in enum]}"
        ) from None
    file_name = weights.url.rsplit("/", 1)[-1]
    try:
        return weights.get_state_dict(progress=False)
    except Exception as err:  # noqa: BLE001 - URLError, socket errors, ...
        hub = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        raise WeightsError(
            f"torchvision weights {enum.__name__}.{weights.name} need a network to download "
            f"({type(err).__name__}: {err}). Without one, put {file_name} in {hub.parent} "
            f"or set model.weights to a local checkpoint file."
        ) from None


HEAD_PREFIXES = ("fc.", "classifier.", "head.", "heads.")


def load_backbone(backbone: nn.Module, path: str | Path, strip_prefix: str = "") -> None:
    """Initialise a task's backbone from a checkpoint of the pretraining stage (or any classifier of
    the same architecture): the classifier head is dropped, every other tensor must fit."""
    state = read_checkpoint(path, key="model.options.backbone_weights")
    state = {k[len(strip_prefix):]: v for k, v in state.items() if k.startswith(strip_prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    own = {k: v for k, v in backbone.state_dict().items() if not k.startswith(HEAD_PREFIXES)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") if keys else "none"

        raise WeightsError(f"backbone checkpoint {path} does not fit {type(backbone).__name__}: missing keys: {show(missing)}; "
                           f"unexpected keys: {show(unexpected)}; shape mismatches: {show(mismatched)}")
    backbone.load_state_dict(state, strict=False)  # the head, if the module has one, keeps its init


def freeze(model: nn.Module, prefixes: list[str]) -> list[str]:
    """Freeze the parameters whose names start with one of ``prefixes`` (the course's "small data:
    freeze the early layers"); returns the frozen names. An unknown prefix is an error."""
    names = [n for n, _ in model.named_parameters()]
    unknown = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if unknown:
        roots = sorted({n.split(".")[0] for n in names})
        raise WeightsError(f"model.frozen_layers {unknown} match no parameter; top-level layers are {roots}")
    frozen = []
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in prefixes):
            p.requires_grad = False
            frozen.append(name)
    return frozen
