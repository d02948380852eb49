"""Initial weights: none, a local checkpoint file, torchvision's named weights, or ImageNet weights resolved offline.

No download happens unless the user named torchvision weights; then a missing
network gives a clear error saying where to put the file instead. ``weights: imagenet`` never downloads:
:func:`resolve_imagenet` looks in a stated order of places on this machine (:func:`candidates`).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cv_models.pretrained import (
    IMAGENET,
    PROVIDERS,
    WEIGHT_PACKAGES,
    Convention,
    input_convention,
    reference_shapes,
    split_name,
)


class WeightsError(RuntimeError):
    pass


def read_checkpoint(path: str | Path, key: str = "model.weights") -> dict[str, torch.Tensor]:
    """A state dict from a file: a bare state dict or ``{"model": state_dict}`` (as this pipeline saves).
    ``key`` is the params.yaml setting that named the file (for the error message)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist ({key} in params.yaml; the pretrain stage writes pretrain.out)"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling problem is a bad file
        raise WeightsError(f"weights file {path} could not be read as a torch checkpoint: {err}") from None
    state = blob.get("model", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} holds no state dict (expected a dict of tensors or {{'model': ...}})")
    return state


def load_into(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, head_prefixes: tuple[str, ...] = ()
) -> list[str]:
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
    state = {k[len(strip_prefix) :]: v for k, v in state.items() if k.startswith(strip_prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    own = {k: v for k, v in backbone.state_dict().items() if not k.startswith(HEAD_PREFIXES)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:

        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") if keys else "none"

        raise WeightsError(
            f"backbone checkpoint {path} does not fit {type(backbone).__name__}: missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; shape mismatches: {show(mismatched)}"
        )
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


# ---------------------------------------------------------------- ImageNet weights, resolved offline (weights: imagenet)


@dataclass
class Resolved:
    """ImageNet weights found for an architecture, renamed to its own keys."""

    state: dict[str, torch.Tensor]
    place: str  # which source (a local file, torchvision's cache, ...)
    path: Path
    sha256: str
    mapping: str  # by name | by order (N tensors, every shape equal)
    convention: Convention  # the input normalisation the weights were trained with

    def record(self) -> dict[str, str]:
        """What MLflow records about the initial weights."""
        return {
            "weights_source": f"{self.place}: {self.path}",
            "weights_sha256": self.sha256,
            "weights_mapping": self.mapping,
            "weights_input_normalization": f"mean {list(self.convention.mean)}, std {list(self.convention.std)}",
        }


def candidates(name: str, local_file: str = "") -> list[tuple[str, Path, Convention]]:
    """Where ImageNet weights of ``name`` may lie, in the order they are tried, each with the input normalisation
    its weights expect: the local file setting, torchvision's cache, timm's and the Hugging Face hub's caches,
    then an installed weights package."""
    provider, arch = split_name(name)
    out = [("model.weights_file", Path(local_file), input_convention(name))] if local_file else []
    torchvision = PROVIDERS["torchvision"].cache_files(arch)  # timm names some of torchvision's networks alike
    out += [(place, path, IMAGENET) for place, path in torchvision]
    out += [
        (place, path, provider.convention(arch))
        for place, path in provider.cache_files(arch)
        if (place, path) not in torchvision
    ]
    if arch in WEIGHT_PACKAGES:
        package = WEIGHT_PACKAGES[arch]
        try:
            out.append((f"package {package.distribution}", Path(package.path()), package.convention))
        except ImportError:
            out.append(
                (
                    f"package {package.distribution} (not installed: pip install {package.distribution})",
                    Path("<not installed>"),
                    package.convention,
                )
            )
    return out


def resolve_imagenet(name: str, local_file: str = "") -> Resolved:
    """The first of :func:`candidates` that exists, read and mapped onto the architecture's keys. Nothing found:
    a :class:`WeightsError` listing every place tried. No download is ever attempted."""
    tried = []
    for place, path, convention in candidates(name, local_file):
        if not path.is_file():
            tried.append(f"{place}: {path}")
            if place == "model.weights_file":
                raise WeightsError(
                    f"model.weights_file {path} does not exist (the local file of ImageNet weights "
                    f"for {name}; leave it empty to search the caches and packages)"
                )
            continue
        state = _read_any(path)
        mapped, mapping = map_by_order(state, reference_shapes(name), f"{place} {path}", name)
        return Resolved(mapped, place, path, file_sha256(str(path)), mapping, convention)
    raise WeightsError(
        f"no ImageNet weights for {name} on this machine (nothing is downloaded); tried, in order:\n  "
        + "\n  ".join(tried)
        + "\nPut a weights file at one of these places or set model.weights_file."
    )


def _read_any(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return read_checkpoint(path, key="model.weights_file")


def map_by_order(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Size], source: str, name: str
) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` under the reference's key names: as it is when the names agree, else paired in order, but only
    when the tensor count and every shape agree; otherwise refused, naming the first mismatches."""
    if list(state) == list(reference) or set(state) == set(reference):
        bad = [k for k in reference if tuple(state[k].shape) != tuple(reference[k])]
        if not bad:
            return dict(state), "by name"
        pairs = [(k, state[k].shape, k, reference[k]) for k in bad]
    else:
        pairs = [
            (fk, fv.shape, rk, rs)
            for (fk, fv), (rk, rs) in zip(state.items(), reference.items())
            if tuple(fv.shape) != tuple(rs)
        ]
        if len(state) == len(reference) and not pairs:
            renamed = {rk: fv for rk, fv in zip(reference, state.values())}
            return renamed, f"by order ({len(state)} tensors, every shape equal; key names differ)"
    shown = "; ".join(f"file {fk} {list(fs)} vs {name} {rk} {list(rs)}" for fk, fs, rk, rs in pairs[:3])
    raise WeightsError(
        f"weights {source} do not fit {name}: {len(state)} tensors in the file, {len(reference)} in the "
        f"model; first mismatches: {shown or 'none by shape, but the counts differ'}"
    )


@functools.lru_cache(maxsize=16)
def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_pretrained(module: nn.Module, resolved: Resolved, head_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Copy the resolved weights into ``module`` (the whole classifier, or its encoder): every tensor of the module
    but its head must be in the weights with its shape; weights the module lacks (a classifier's layers above an
    encoder's last stage) are left out. Returns the names left out."""
    own = module.state_dict()
    body = [k for k in own if not k.startswith(head_prefixes)]
    missing = [k for k in body if k not in resolved.state]
    wrong = [k for k in body if k in resolved.state and resolved.state[k].shape != own[k].shape]
    if missing or wrong:
        raise WeightsError(
            f"ImageNet weights from {resolved.path} do not fit {type(module).__name__}: missing keys "
            f"{missing[:5]}, shape mismatches {wrong[:5]}"
        )
    module.load_state_dict({k: resolved.state[k] for k in body}, strict=False)
    return [k for k in resolved.state if k not in body]
