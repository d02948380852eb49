"""MLflow Models and the Model Registry, called by the evaluate stage.

The better of baseline and augmented, chosen by the validation primary metric (the test split is for
reporting only), is logged as an MLflow pyfunc model: :class:`CVModel` takes images as a uint8 array
(``N x H x W x 3``, or one ``H x W x 3`` image) and returns the task's predictions as rows, exactly the
records ``python -m tasks predict`` writes. It is registered as ``cv-<task>`` with tags (git commit, data
version, params hash, validation and test metrics), and the alias ``champion`` moves to it only when it
beats the current champion's validation metric on the same data version. When the champion was scored
on another version of the validation data, it is scored again on the current one first.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from tasks.config import config_hash
from tasks.paths import models
from tasks.track.data_version import read_data_version
from tasks.use.inference import best_stage, load_bundle, load_registered, write_bundle

CODE = [str(Path(__file__).resolve().parents[2] / pkg) for pkg in ("tasks", "cv_models")]  # shipped with the model
MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")  # models from code: the model is this file, never a pickle


def model_name(params, task_name: str) -> str:
    return params.registry.name_prefix + task_name.replace("_", "-")


def as_images(model_input: Any) -> list[np.ndarray]:
    """``N x H x W x 3`` / ``H x W x 3`` arrays, a list of images, or a one-column DataFrame of them -> uint8 images."""
    if isinstance(model_input, pd.DataFrame):
        model_input = list(model_input.iloc[:, 0])
    if isinstance(model_input, dict):  # {"inputs": ...} as some clients send it
        model_input = next(iter(model_input.values()))
    if isinstance(model_input, np.ndarray):
        images = [model_input] if model_input.ndim == 3 else list(model_input)
    else:
        images = list(model_input)  # images of different sizes
    out = []
    for k, im in enumerate(images):
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"image {k}: expected H x W x 3 RGB values, got shape {im.shape}")
        out.append(np.clip(im, 0, 255).astype(np.uint8))
    return out


class CVModel(mlflow.pyfunc.PythonModel):
    """The pipeline's model as a pyfunc: the bundle (weights, settings, normalisation) is its artifact."""

    def load_context(self, context):
        self.loaded = load_bundle(None, Path(context.artifacts["bundle"]))

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from PIL import Image

        task, rows = self.loaded.task, []
        for image_id, array in enumerate(as_images(model_input), start=1):
            pred = task.predict_image(self.loaded.model, Image.fromarray(array), self.loaded.normalize, image_id)
            rows += pred.records
        return pd.DataFrame(rows)


def _example(task) -> np.ndarray:
    """One test image (else a grey one) as the input example: ``1 x H x W x 3`` uint8."""
    try:
        image = task.dataset("test", None)[0][0]
        return np.asarray(image.convert("RGB"))[None]
    except Exception:  # noqa: BLE001 - an empty test split: any image of the training size will do
        h, w = task.cfg.image_hw
        return np.full((1, h, w, 3), 127, dtype=np.uint8)


def output_schema(sample: pd.DataFrame):
    """The predictions' columns: integer ones declared as long (MLflow's inference warns on integers, which cannot
    hold a missing value: predictions never miss one), the others as MLflow infers them."""
    from mlflow.types import ColSpec, DataType, Schema

    ints = [c for c in sample.columns if pd.api.types.is_integer_dtype(sample[c])]
    rest = mlflow.models.infer_signature(sample.drop(columns=ints)).inputs.inputs if len(ints) < sample.shape[1] else []
    specs = {**{spec.name: spec for spec in rest}, **{c: ColSpec(DataType.long, c) for c in ints}}
    return Schema([specs[c] for c in sample.columns])


def log_model(task, loaded, bundle: Path):
    """The pyfunc model in the active run: the model file, the bundle as its artifact, the shipped code, a signature
    (any number of uint8 H x W x 3 images in; the task's records out) and one test image as the input example."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    example = _example(task)
    output = CVModel()
    output.loaded = loaded
    try:
        outputs = output_schema(output.predict(None, example))
    except Exception:  # noqa: BLE001 - outputs the schema cannot describe (none predicted on the example): inputs only
        outputs = None
    # any number of images of any size (one request holds images of one size)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]), outputs=outputs)
    import torch
    import torchvision

    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"mlflow=={mlflow.__version__}",
        "pandas",
        "numpy",
        "pillow",
        "pycocotools",
        "pydantic",
        "pyyaml",
    ]
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_FILE),
        artifacts={"bundle": str(bundle)},
        code_paths=CODE,
        signature=signature,
        input_example=example,
        pip_requirements=requirements,
    )


def _rescore(st, loaded, device) -> float:
    """The champion's validation metric on the current validation split, with its own preprocessing."""
    from cv_models import get_task
    from tasks.training import engine

    if loaded.task.class_names() != st.task.class_names():
        raise ValueError(f"classes differ ({loaded.task.class_names()} vs {st.task.class_names()})")
    scorer = get_task(st.task_name, loaded.task.cfg.model_copy(update={"data": st.cfg.data}))
    scorer.normstats_dir = loaded.task.normstats_dir
    val = scorer.dataset("val", scorer.eval_transforms(loaded.normalize))
    loader = engine.make_loader(scorer, val, st.cfg.train.eval_batch_size, False, st.params.seed)
    return float(scorer.evaluate(loaded.model.to(device), loader, device).metrics[st.task.primary_metric])


def publish(st, test_metrics: dict[str, dict], device) -> dict[str, Any]:
    """Log the better model as an MLflow model in the stage's run, register it, decide on the champion alias.

    Returns what the results table shows: name, version, chosen stage, champion version and the decision.
    """
    reg, primary = st.params.registry, st.task.primary_metric
    name = model_name(st.params, st.task_name)
    stage = best_stage(st.task_name, primary)
    version_all = read_data_version(st.task_name)
    version_val = read_data_version(st.task_name, "val")
    val_metric, info = log_best(st, stage, version_all["digest"])
    tags = version_tags(st, stage, val_metric, test_metrics[stage], version_all["digest"], version_val["digest"])
    client = mlflow.MlflowClient()
    mv = register_version(st, client, name, info, tags)
    decision = decide_champion(st, client, name, mv.version, val_metric, version_val["digest"], device)
    for k, v in decision["tags"].items():
        client.set_model_version_tag(name, mv.version, k, v)
    if decision["move"]:
        client.set_registered_model_alias(name, reg.alias, mv.version)
    champion = client.get_model_version_by_alias(name, reg.alias).version
    print(
        f"[registry] {name}: registered version {mv.version} ({stage}, val {primary} {val_metric:.4f}); {decision['text']}"
    )
    return {
        "name": name,
        "version": int(mv.version),
        "stage": stage,
        f"val_{primary}": val_metric,
        "alias": reg.alias,
        "champion_version": int(champion),
        "decision": decision["text"],
        "model_uri": info.model_uri,
        "data_version": version_all["digest"],
    }


def log_best(st, stage: str, data_version: str) -> tuple[float, Any]:
    """The chosen stage's model as a bundle, logged as a pyfunc model in the active run; its validation metric and
    the logged model's info."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_bundle(
            st.task,
            models(st.task_name, stage) / "model.pt",
            Path(tmp) / "bundle",
            extra={"stage": stage, "data_version": data_version},
        )
        loaded = load_bundle(st.task_name, bundle)
        val_metric = float(loaded.info["val_metrics"].get(st.task.primary_metric, float("nan")))
        return val_metric, log_model(st.task, loaded, bundle)


def version_tags(st, stage: str, val_metric: float, test_metrics: dict, data_version: str, data_version_val: str):
    """The model version's tags: where it comes from (commit, data versions, params hash) and its scores."""
    from tasks.track.tracking import git_commit

    tests = {k: v for k, v in test_metrics.items() if "/" not in k and isinstance(v, (int, float))}
    return {
        "cv_task": st.task_name,
        "stage": stage,
        "git_commit": git_commit(),
        "data_version": data_version,
        "data_version_val": data_version_val,
        "params_hash": config_hash(st.cfg),
        f"val.{st.task.primary_metric}": repr(float(val_metric)),
        **{f"test.{k}": f"{v:.6f}" for k, v in tests.items()},
    }


def register_version(st, client, name: str, info, tags: dict[str, str]):
    """A new version of the registered model ``name`` (created on first use) for the logged model."""
    try:
        client.create_registered_model(
            name,
            tags={"cv_task": st.task_name},
            description=f"{st.task_name}: the pipeline's better model by validation {st.task.primary_metric}",
        )
    except mlflow.exceptions.MlflowException:
        pass  # already there
    # the client, not mlflow.register_model: that one prints "already exists. Creating a new version..." besides
    return client.create_model_version(name, info.model_uri, run_id=info.run_id, tags=tags, model_id=info.model_id)


def decide_champion(st, client, name: str, version: str, val_metric: float, data_version_val: str, device) -> dict:
    """Move the alias only when the new version beats the champion's validation metric on the same data version."""
    alias, primary = st.params.registry.alias, st.task.primary_metric
    try:
        champ = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return {"move": True, "text": f"first {alias}", "tags": {"champion_decision": f"first {alias}"}}
    champ_val = float(champ.tags.get(f"val.{primary}", "-inf"))
    how = "its recorded score"
    if champ.tags.get("data_version_val") != data_version_val:
        try:
            champ_val = _rescore(st, load_registered(st.task_name, f"models:/{name}/{champ.version}"), device)
            how = "rescored on this data version"
        except Exception as err:  # noqa: BLE001 - a champion that cannot be scored here cannot hold the alias
            champ_val, how = (
                float("-inf"),
                f"not scorable on this data version ({type(err).__name__}: {str(err)[:200]})",
            )
    move = val_metric > champ_val
    text = (
        f"val {primary} {val_metric:.4f} vs {alias} version {champ.version} {champ_val:.4f} ({how}) on data version "
        f"{data_version_val[:12]}: "
        + (f"{alias} moved to version {version}" if move else f"{alias} stays on version {champ.version}")
    )
    tags = {
        "champion_decision": text,
        f"previous_{alias}_version": str(champ.version),
        f"previous_{alias}_val.{primary}": repr(float(champ_val)),
    }
    return {"move": move, "text": text, "tags": tags}
