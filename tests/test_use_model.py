"""From a trained model to its use: `python -m tasks predict` on new images for all four tasks, its
predictions on the test split scored to the evaluate stage's figure, bad inputs, real datasets, and the
Model Registry's champion, served over HTTP by `mlflow models serve` (127.0.0.1, local env) and run by
`mlflow models predict`: both answer like `python -m tasks predict` (classification and detection).

One tiny project trains every task for two epochs (module fixture); every test here uses its models."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.conftest import REPO, TINY, write_params

TASKS = ("classification", "segmentation", "detection", "instance_segmentation")
DATASETS = Path(os.environ.get("CV_SHARED_DATASETS") or REPO.parent / "shared" / "datasets")  # the env: from a worktree
SIZE = (48, 64)  # height, width of the dense tasks and detection
TEST_INPUT = {
    "classification": "data/shapes/classification/test",
    "segmentation": "data/shapes/scenes/images/test",
    "detection": "data/shapes/scenes/images/test",
    "instance_segmentation": "data/shapes/scenes/images/test",
}


def overrides() -> dict:
    ov = dict(TINY)
    for t in TASKS:
        ov.update(
            {
                f"tasks.{t}.train.epochs": 2,
                f"tasks.{t}.overfit_check.enabled": False,
                f"tasks.{t}.train.num_threads": 1,
                f"tasks.{t}.preview_samples": 4,
            }
        )
    for t in TASKS[1:]:  # non-square, below the 64 x 64 scenes: the evaluation scores at each image's own size
        ov[f"tasks.{t}.image_size"] = list(SIZE)
    return ov


def train_project(root: Path, tiny_shapes: Path, tasks=TASKS) -> Path:
    """Every stage of ``tasks`` run in-process in ``root`` (the working folder must be ``root``)."""
    from tasks import augmented, baseline, evaluate, normstats, validate

    shutil.copytree(tiny_shapes, root / "data" / "shapes")
    params = write_params(root, overrides())
    for task in tasks:
        for stage in (validate, normstats, baseline, augmented, evaluate):
            stage.run(task, params)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_shapes):
    root = tmp_path_factory.mktemp("predict")
    before, uri = os.getcwd(), os.environ["MLFLOW_TRACKING_URI"]
    # a registry of its own: versions other test modules register must not take part in the champion decisions
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.chdir(root)
    try:
        yield train_project(root, tiny_shapes)
    finally:
        os.chdir(before)
        os.environ["MLFLOW_TRACKING_URI"] = uri


def task_of(root: Path, name: str):
    from cv_models import get_task
    from tasks.config import load_params

    return get_task(name, load_params(root / "params.yaml").task(name))


def evaluated(root: Path, name: str) -> tuple[dict, dict]:
    folder = root / "outputs" / name / "evaluate"
    return json.loads((folder / "metrics.json").read_text()), json.loads((folder / "registry.json").read_text())


def remap(results: list[dict], out: Path, id_of_path: dict[str, int]) -> list[dict]:
    """Our results' image ids (position in the input) -> the evaluation's ground-truth ids, by file."""
    path_of = {im["id"]: str(Path(im["file_name"]).resolve()) for im in json.loads((out / "images.json").read_text())}
    return [{**r, "image_id": id_of_path[path_of[r["image_id"]]]} for r in results]


def predicted_metric(root: Path, name: str, out: Path) -> dict[str, float]:
    """The task's test metric recomputed from what `predict` wrote."""
    task = task_of(root, name)
    if name == "classification":
        df = pd.read_csv(out / "predictions.csv")
        return {"accuracy": float((df["class"] == df["file"].map(lambda f: Path(f).parent.name)).mean())}
    if name == "segmentation":
        import torch

        from cv_models.segmentation import confusion

        n = len(task.class_names())
        cm = torch.zeros(n, n, dtype=torch.long)
        for im in json.loads((out / "images.json").read_text()):
            pred = torch.from_numpy(np.asarray(Image.open(out / im["mask"])).astype(np.int64))
            truth = torch.from_numpy(
                np.asarray(
                    Image.open(root / "data/shapes/scenes/masks/test" / (Path(im["file_name"]).stem + ".png"))
                ).astype(np.int64)
            )
            assert pred.shape == truth.shape
            cm += confusion(pred, truth, n, task.ignore_index)
        return task._score(cm).metrics
    results = json.loads((out / "coco_results.json").read_text())
    details = root / "outputs" / name / "evaluate" / "details"
    if name == "detection":
        from cv_models.detection import coco_map

        ids = {str(Path(r["path"]).resolve()): r["image_id"] for r in task.records("test")}
        gt = json.loads((details / "ground_truth_test.json").read_text())
        return coco_map(gt, remap(results, out, ids), task.class_names())[0]
    from cv_models.instance_segmentation import coco_scores

    ids = {str(Path(r["path"]).resolve()): r["image_id"] for r in task._records("test")}
    gt = json.loads((details / "coco_ground_truth.json").read_text())
    return coco_scores(gt, remap(results, out, ids), task.class_names())[0]


@pytest.mark.parametrize("name", TASKS)
def test_predictions_on_the_test_split_give_the_evaluate_stages_metric(trained, name, monkeypatch):
    from tasks.use import predict

    monkeypatch.chdir(trained)
    metrics, registered = evaluated(trained, name)
    out = trained / "pred" / name
    summary = predict.run(name, "best", TEST_INPUT[name], out)
    assert summary["images"] == metrics["n_test"] and summary["failed"] == 0
    assert summary["images_per_second"] > 0 and (out / "summary.md").exists()
    got = predicted_metric(trained, name, out)
    stage = registered["stage"]  # "best" is the registered one: the better validation metric
    keys = {
        "classification": ["accuracy"],
        "segmentation": ["miou", "pixel_accuracy"],
        "detection": ["map50", "map"],
        "instance_segmentation": ["mask_map50", "box_map50", "mask_map"],
    }[name]
    for key in keys:
        assert got[key] == pytest.approx(metrics[stage][key], abs=1e-6), (key, got[key], metrics[stage][key])
    if name != "classification":  # an overlay per image for the dense tasks
        assert len(list((out / "overlays").glob("*.png"))) == summary["images"]


def recompute_snippet(details: Path, model: str) -> dict:
    """Run the python block of details/RECOMPUTE.md on ``model``'s file, in details/; its variables and printout."""
    import contextlib
    import io

    code = (details / "RECOMPUTE.md").read_text().split("```python\n")[1].split("```")[0]
    here, printed, scope = os.getcwd(), io.StringIO(), {}
    os.chdir(details)
    try:
        with contextlib.redirect_stdout(printed):
            exec(code.replace("augmented", model), scope)  # noqa: S102 - our own documentation, run as a user would
    finally:
        os.chdir(here)
    scope["printed"] = {}  # "name value" lines (pycocotools prints its own lines too)
    for line in printed.getvalue().splitlines():
        with contextlib.suppress(ValueError):
            key, value = line.split()
            scope["printed"][key] = float(value)
    return scope


@pytest.mark.parametrize("name", TASKS)
def test_evaluate_details_rescore_to_the_reported_metric_at_each_images_own_size(trained, name):
    """The evaluate stage's per-image predictions (details/), rescored with the library RECOMPUTE.md names, give
    metrics.json's figures; they are at each test image's own resolution (64 x 64 scenes, trained at 48 x 64)."""
    details = trained / "outputs" / name / "evaluate" / "details"
    metrics = json.loads((trained / "outputs" / name / "evaluate" / "metrics.json").read_text())
    names = task_of(trained, name).class_names()
    for model in ("baseline", "augmented"):
        m, ran = metrics[model], recompute_snippet(details, model)
        if name == "classification":
            from sklearn.metrics import accuracy_score, f1_score

            df = pd.read_csv(details / f"predictions_{model}.csv")
            assert (
                len(df) == metrics["n_test"]
                and df["file"].map(lambda f: Path(f).parent.name).eq(df["true_class"]).all()
            )
            assert np.allclose(df[[f"prob_{c}" for c in names]].sum(1), 1, atol=1e-4)
            assert accuracy_score(df["true_class"], df["predicted_class"]) == pytest.approx(m["accuracy"], abs=1e-9)
            f1 = f1_score(df["true_class"], df["predicted_class"], labels=names, average="macro", zero_division=0)
            assert f1 == pytest.approx(m["macro_f1"], abs=1e-9)
            assert ran["printed"] == pytest.approx({"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}, abs=1e-9)
        elif name == "segmentation":
            rows = pd.read_csv(details / "masks.csv")
            assert len(rows) == metrics["n_test"]
            inter, union = np.zeros(len(names)), np.zeros(len(names))
            for r in rows.itertuples():
                truth, pred = (np.asarray(Image.open(details / f)) for f in (r.ground_truth, getattr(r, model)))
                assert truth.shape == pred.shape == Image.open(r.image).size[::-1] == (64, 64)  # the image's own size
                valid = truth != 255
                for k in range(len(names)):
                    inter[k] += ((truth == k) & (pred == k) & valid).sum()
                    union[k] += (((truth == k) | (pred == k)) & valid).sum()
            assert (inter[union > 0] / union[union > 0]).mean() == pytest.approx(m["miou"], abs=1e-9)
            assert ran["printed"]["miou"] == pytest.approx(m["miou"], abs=1e-9)
        else:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            gt_file, dt_file = (
                ("ground_truth_test.json", f"predictions_{model}.json")
                if name == "detection"
                else ("coco_ground_truth.json", f"coco_results_{model}.json")
            )
            gt = COCO(str(details / gt_file))
            for im in gt.dataset["images"]:  # the original images, by file name and size
                assert name != "detection" or im["source_id"] is not None  # its id in the dataset's own annotations
                assert Image.open(trained / "data/shapes/scenes/images/test" / Path(im["file_name"]).name).size == (
                    im["width"],
                    im["height"],
                )
            results = json.loads((details / dt_file).read_text())
            assert results and all(0 <= r["bbox"][0] + r["bbox"][2] <= 64 + 1e-3 for r in results)
            for iou_type, prefix in (("bbox", "") if name == "detection" else ("bbox", "box_"), ("segm", "mask_"))[
                : 1 if name == "detection" else 2
            ]:
                ev = COCOeval(gt, gt.loadRes(str(details / dt_file)), iou_type)
                ev.evaluate(), ev.accumulate(), ev.summarize()
                assert m[f"{prefix}map"] == pytest.approx(max(ev.stats[0], 0), abs=1e-9)
                assert m[f"{prefix}map50"] == pytest.approx(max(ev.stats[1], 0), abs=1e-9)
            keys = (
                ("map", "map50", "map75") if name == "detection" else ("box_map", "box_map50", "mask_map", "mask_map50")
            )
            assert ran["printed"] == pytest.approx({k: m[k] for k in ran["printed"]}, abs=1e-9) and set(keys) <= set(
                ran["printed"]
            )


@pytest.mark.parametrize("name", TASKS)
def test_outputs_are_at_the_inputs_own_resolution(trained, name, monkeypatch, tmp_path):
    from pycocotools import mask as mask_utils

    from tasks.use import predict

    monkeypatch.chdir(trained)
    source = sorted(Path(TEST_INPUT[name]).rglob("*.png"))[0]
    image = Image.open(source).convert("RGB").resize((150, 90))
    image.save(tmp_path / "wide.png")
    out = tmp_path / "out"
    predict.run(name, "augmented", str(tmp_path / "wide.png"), out)
    assert json.loads((out / "images.json").read_text())[0]["width"] == 150
    if name == "classification":
        row = pd.read_csv(out / "predictions.csv").iloc[0]
        assert row[[c for c in row.index if c.startswith("prob_")]].sum() == pytest.approx(1, abs=1e-4)
        return
    assert Image.open(out / "overlays" / "wide.png").size == (150, 90)
    if name == "segmentation":
        mask = np.asarray(Image.open(out / "masks" / "wide.png"))
        assert mask.shape == (90, 150) and mask.max() < len(task_of(trained, name).class_names())
        return
    results = json.loads((out / "coco_results.json").read_text())
    assert results, "an untrained-looking model: no detections at all"
    for r in results:
        x, y, w, h = r["bbox"]
        assert -1e-3 <= x and x + w <= 150 + 1e-3 and -1e-3 <= y and y + h <= 90 + 1e-3
        if name == "instance_segmentation":
            assert r["segmentation"]["size"] == [90, 150]
            assert mask_utils.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()}).shape == (
                90,
                150,
            )


def test_bad_inputs_are_named_and_the_other_images_still_predicted(trained, monkeypatch, tmp_path, capsys):
    from tasks.cli import main

    monkeypatch.chdir(trained)
    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted(Path(TEST_INPUT["classification"]).rglob("*.png"))[:2]
    for k, p in enumerate(good):
        shutil.copy(p, folder / f"good{k}.png")
    (folder / "broken.png").write_bytes(b"this is not a png")
    Image.open(good[0]).convert("L").save(folder / "gray.png")
    Image.open(good[0]).convert("RGBA").save(folder / "rgba.png")
    (folder / "notes.txt").write_text("not an image suffix: not an input")
    out = tmp_path / "out"
    code = main(["predict", "--task", "classification", "--model", "best", "--input", str(folder), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and "broken.png: not readable as an image" in err and "skipped 1 of 5 input(s)" in err
    df = pd.read_csv(out / "predictions.csv")
    assert sorted(Path(f).name for f in df["file"]) == ["good0.png", "good1.png", "gray.png", "rgba.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 4 and summary["failed"] == 1
    assert any("gray.png: mode L converted to RGB" in n for n in summary["notes"])
    assert any("rgba.png: mode RGBA converted to RGB" in n for n in summary["notes"])

    code = main(
        ["predict", "--task", "classification", "--input", str(folder), "--out", str(tmp_path / "strict"), "--strict"]
    )
    assert code == 1 and "1 of 5 input(s) skipped" in capsys.readouterr().err  # --strict: any skipped file fails
    assert len(pd.read_csv(tmp_path / "strict" / "predictions.csv")) == 4  # ... after writing the others

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--task", "classification", "--input", str(empty), "--out", str(tmp_path / "o2")]) == 1
    assert "folder holds no image files" in capsys.readouterr().err
    assert (
        main(
            ["predict", "--task", "classification", "--input", str(tmp_path / "*.jpeg"), "--out", str(tmp_path / "o3")]
        )
        == 1
    )
    assert "the pattern matches no file" in capsys.readouterr().err

    code = main(
        [
            "predict",
            "--task",
            "segmentation",
            "--model",
            "models/classification/augmented/model.pt",
            "--input",
            str(folder / "good0.png"),
            "--out",
            str(tmp_path / "o4"),
        ]
    )
    assert code == 1 and "is a 'classification' model, not 'segmentation'" in capsys.readouterr().err
    code = main(
        [
            "predict",
            "--task",
            "classification",
            "--model",
            str(folder / "broken.png"),
            "--input",
            str(folder / "good0.png"),
            "--out",
            str(tmp_path / "o5"),
        ]
    )
    assert code == 1 and "not readable as a model file" in capsys.readouterr().err


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid 1 x 1 PNG whose header declares ``width`` x ``height`` (a decompression bomb's header, a few bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\0\0\0")) + chunk(b"IEND", b"")
    )
    return path


def test_predict_skips_a_bomb_and_notes_a_1x1_image_and_writes_the_rest(trained, monkeypatch, tmp_path, capsys):
    """validate's checks before decoding: the bomb and an image above data.max_size are named with their rule and
    skipped, a 1 x 1 image is predicted with a note; the good images are written with a skip report."""
    from tasks.cli import main

    monkeypatch.chdir(trained)
    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted(Path(TEST_INPUT["classification"]).rglob("*.png"))[:4]
    for k, p in enumerate(good):
        shutil.copy(p, folder / f"good{k}.png")
    png_declaring(folder / "bomb.png", 20000, 20000)
    png_declaring(folder / "huge.png", 5000, 10)  # under PIL's pixel limit, above data.max_size 4096
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "tiny.png")
    out = tmp_path / "out"
    code = main(["predict", "--task", "classification", "--input", str(folder), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (
        "bomb.png: 20000x20000 declared, DecompressionBombError (rule: at most" in err
        and "skipped 2 of 7 input(s)" in err
    )
    assert "huge.png: 5000x10 (rule: width and height at most data.max_size 4096)" in err
    df = pd.read_csv(out / "predictions.csv")
    assert sorted(Path(f).name for f in df["file"]) == ["good0.png", "good1.png", "good2.png", "good3.png", "tiny.png"]
    skipped = pd.read_csv(out / "skipped.csv")
    assert sorted(Path(f).name for f in skipped["file"]) == ["bomb.png", "huge.png"]
    assert all("(rule: " in r for r in skipped["rule"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 5 and summary["failed"] == 2
    assert any("tiny.png: 1x1 is below data.min_size" in n for n in summary["notes"])
    assert "## Skipped inputs" in (out / "summary.md").read_text()

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(folder / "bomb.png", only_bad / "bomb.png")
    code = main(["predict", "--task", "classification", "--input", str(only_bad), "--out", str(tmp_path / "o2")])
    assert code == 1 and "1 of 1 input(s) skipped" in capsys.readouterr().err  # nothing predicted: a failure
    assert pd.read_csv(tmp_path / "o2" / "skipped.csv")["file"].tolist() == [str(only_bad / "bomb.png")]


@pytest.mark.skipif(not DATASETS.is_dir(), reason=f"{DATASETS} is absent (the shared real datasets)")
@pytest.mark.parametrize(
    "name, pattern, size",
    [
        ("classification", "trashnet150/data/dataset-resized/cardboard/cardboard1*.jpg", None),
        ("detection", "bccd/BCCD/JPEGImages/BloodImage_0000[0-2].jpg", (640, 480)),
    ],
)
def test_predict_on_a_real_dataset(trained, monkeypatch, tmp_path, name, pattern, size):
    """The shapes-trained models on real photographs: every file read, predicted and written at its own size."""
    import glob

    from tasks.use import predict

    monkeypatch.chdir(trained)
    files = glob.glob(str(DATASETS / pattern))
    summary = predict.run(name, "best", str(DATASETS / pattern), tmp_path)
    assert summary["images"] == len(files) > 0 and summary["failed"] == 0
    images = json.loads((tmp_path / "images.json").read_text())
    if size:
        assert all((im["width"], im["height"]) == size for im in images)
        assert len(list((tmp_path / "overlays").glob("*.png"))) == len(files)
    else:
        assert len(pd.read_csv(tmp_path / "predictions.csv")) == len(files)


def test_registered_champion_predicts_like_the_best_model_and_keeps_the_alias_unless_beaten(
    trained, monkeypatch, tmp_path
):
    import mlflow

    from tasks import evaluate
    from tasks.use import predict

    monkeypatch.chdir(trained)
    _, registered = evaluated(trained, "classification")
    assert registered["name"] == "cv-classification" and registered["champion_version"] == registered["version"]
    a = predict.run("classification", "best", TEST_INPUT["classification"], tmp_path / "best")
    b = predict.run(
        "classification", "models:/cv-classification@champion", TEST_INPUT["classification"], tmp_path / "champ"
    )
    assert a["images"] == b["images"]
    assert pd.read_csv(tmp_path / "best" / "predictions.csv").equals(
        pd.read_csv(tmp_path / "champ" / "predictions.csv")
    )

    evaluate.run("classification", trained / "params.yaml")  # the same models on the same data: no better, alias stays
    _, again = evaluated(trained, "classification")
    client = mlflow.MlflowClient()
    for name in TASKS:  # every task's evaluate stage registered its model and gave it the alias
        champion = client.get_model_version_by_alias(f"cv-{name.replace('_', '-')}", "champion")
        assert champion.tags["cv_task"] == name
    version = client.get_model_version("cv-classification", str(again["version"]))
    assert again["version"] == registered["version"] + 1 and again["champion_version"] == registered["version"]
    assert version.tags["previous_champion_version"] == str(registered["version"])
    assert version.tags["previous_champion_val.accuracy"] == version.tags["val.accuracy"]
    assert "champion stays" in version.tags["champion_decision"]
    from tasks.config import config_hash, load_params
    from tasks.track.tracking import git_commit

    test_metrics, _ = evaluated(trained, "classification")
    assert version.tags["git_commit"] == git_commit()  # the project folder's commit ("unknown" outside git)
    assert version.tags["params_hash"] == config_hash(load_params(trained / "params.yaml").task("classification"))
    assert float(version.tags["test.accuracy"]) == pytest.approx(test_metrics[again["stage"]]["accuracy"], abs=1e-6)
    assert (
        version.tags["data_version"]
        == json.loads((trained / "outputs/classification/validate/report.json").read_text())["data_version"]["all"][
            "digest"
        ]
    )
    from tasks.report import results_table

    assert f"cv-classification v{again['version']}" in results_table(list(TASKS))

    # a new version of the validation data: the champion is scored again on it before the comparison
    report_path = trained / "outputs/classification/validate/report.json"
    original = report_path.read_text()
    report = json.loads(original)
    report["data_version"]["val"]["digest"] = "0" * 64
    report_path.write_text(json.dumps(report))
    try:
        evaluate.run("classification", trained / "params.yaml")
    finally:
        report_path.write_text(original)
    _, third = evaluated(trained, "classification")
    tags = client.get_model_version("cv-classification", str(third["version"])).tags
    assert "rescored on this data version" in tags["champion_decision"], tags["champion_decision"]
    # the same model on the same images: the rescored figure is the one recorded at training
    assert float(tags["previous_champion_val.accuracy"]) == pytest.approx(float(version.tags["val.accuracy"]), abs=1e-6)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", TASKS)
def test_export_passes_its_parity_check_and_describes_itself(trained, name, fmt, monkeypatch, tmp_path):
    from tasks.use import export

    monkeypatch.chdir(trained)
    meta = export.run(name, "best", fmt, tmp_path, trained / "params.yaml")
    path = tmp_path / ("model.onnx" if fmt == "onnx" else "model.torchscript.pt")
    described = json.loads(path.with_suffix(".json").read_text())
    assert described == meta and described["parity"]["passed"] and described["parity"]["images"] >= 3
    assert described["classes"] == task_of(trained, name).class_names()
    assert described["image_size"] == (32 if name == "classification" else list(SIZE))
    assert described["input"]["shape"][-2:] == ([32, 32] if name == "classification" else list(SIZE))
    worst, tol = described["parity"]["worst"], described["parity"]["tolerance"]
    if name in ("detection", "instance_segmentation"):
        assert worst["unmatched"] == 0 and worst["detections_ref"] > 0  # detections compared, not two empty lists
        assert worst["box_px"] <= tol["box_px"] and worst["score"] <= tol["score"]
        if name == "instance_segmentation":
            assert worst["mask_iou"] >= tol["mask_iou"] and worst["mask_prob"] <= tol["mask_prob"]
    else:
        assert worst["logits"] <= tol["logits"]
        assert described["normalization"]["mean"] and "before the model" in described["normalization"]["applied"]


def test_parity_check_fails_on_another_models_outputs(trained, monkeypatch, tmp_path):
    """The check can fail: baseline's exported file against the augmented model's PyTorch outputs."""
    from tasks.use import export
    from tasks.use.inference import load

    monkeypatch.chdir(trained)
    export.run("segmentation", "baseline", "onnx", tmp_path, trained / "params.yaml")
    images = export.parity_images("segmentation", trained / "params.yaml", None, 3)
    with pytest.raises(export.ParityError, match="differs from PyTorch"):
        export.parity(load("segmentation", "augmented"), "onnx", tmp_path / "model.onnx", images)


def test_predict_flows_are_served_beside_the_training_flows(trained, monkeypatch, tmp_path):
    import flows.predict
    from flows.predict import FLOWS
    from flows.serve import deployments

    monkeypatch.chdir(trained)
    names = {d.flow_name for d in deployments(str(trained / "params.yaml"))}
    assert {f"predict-{t.replace('_', '-')}" for t in TASKS} <= names and "train-detection" in names
    # the flow's function runs the predict stage (a served run, with Prefect's engine: test_e2e_detection.py)
    monkeypatch.setattr(flows.predict, "predict_task", flows.predict.predict_task.fn)
    summary = FLOWS["classification"].fn(input=TEST_INPUT["classification"], out=str(tmp_path / "out"))
    assert summary["images"] == len(pd.read_csv(tmp_path / "out" / "predictions.csv"))


# ---------------------------------------------------------------- the champion served over HTTP (MLflow)

SERVED = ("classification", "detection")
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture
def served(trained):
    """`mlflow models serve` of a task's champion; yields a function posting images and returning the predictions."""
    procs = []

    def start(task: str):
        port = free_port()
        log = open(trained / f"serve-{task}.log", "w")
        proc = subprocess.Popen(
            [
                MLFLOW,
                "models",
                "serve",
                "-m",
                f"models:/cv-{task.replace('_', '-')}@champion",
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-w",
                "1",
            ],
            cwd=trained,
            env=env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, (trained / f"serve-{task}.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("mlflow models serve did not answer /ping within 180 s")

        def post(images: np.ndarray) -> list[dict]:
            body = json.dumps({"inputs": images.tolist()}).encode()
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())["predictions"]

        return post

    yield start
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def predicted_rows(trained: Path, task: str, files: list[Path], out: Path) -> list[dict]:
    from tasks.use import predict

    for k, f in enumerate(files):  # one file per call: image ids start at 1, as in a one-image request
        predict.run(task, "models:/cv-" + task.replace("_", "-") + "@champion", str(f), out / str(k))
    if task == "classification":
        return [
            pd.read_csv(out / str(k) / "predictions.csv").drop(columns=["file"]).iloc[0].to_dict()
            for k in range(len(files))
        ]
    return [json.loads((out / str(k) / "coco_results.json").read_text()) for k in range(len(files))]


@pytest.mark.e2e
@pytest.mark.parametrize("task", SERVED)
def test_served_champion_answers_like_the_predict_command(trained, served, task, monkeypatch, tmp_path):
    monkeypatch.chdir(trained)
    files = sorted(Path(TEST_INPUT[task]).rglob("*.png"))[:3]
    expected = predicted_rows(trained, task, files, tmp_path)
    post = served(task)
    for f, want in zip(files, expected):
        got = post(np.asarray(Image.open(f).convert("RGB"))[None])
        if task == "classification":
            assert len(got) == 1 and got[0]["class"] == want["class"]
            for key, value in want.items():
                if key.startswith("prob_") or key == "score":
                    assert got[0][key] == pytest.approx(value, abs=1e-5)
        else:
            assert len(got) == len(want) > 0
            for g, w in zip(got, want):
                assert (g["category_id"], g["category"]) == (w["category_id"], w["category"])
                assert g["score"] == pytest.approx(w["score"], abs=1e-5)
                assert g["bbox"] == pytest.approx(w["bbox"], abs=1e-2)
    if task == "detection":  # a batch of images of one size in one request: ids are positions in the batch
        batch = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        got = post(batch)
        assert sorted({g["image_id"] for g in got}) == [k + 1 for k, w in enumerate(expected) if w]


def raw_post(port: int, headers: dict, body: bytes = b"") -> tuple[int, bytes]:
    """One POST /invocations on a plain socket (a declared length need not be sent): status and reply body."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        head = "".join(
            f"{k}: {v}\r\n" for k, v in {"Host": "127.0.0.1", "Content-Type": "application/json", **headers}.items()
        )
        sock.sendall(f"POST /invocations HTTP/1.1\r\n{head}\r\n".encode() + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    return status, reply.split(b"\r\n\r\n", 1)[1]


@pytest.mark.e2e
def test_served_model_refuses_a_request_over_the_size_limit_with_413(trained, tmp_path):
    """python -m tasks.use.serve_model: MLflow's scoring server behind serving.max_request_mb (here 1 MB)."""
    port = free_port()
    log = tmp_path / "serve.log"
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((trained / "params.yaml").read_text())
    params.write_text(yaml.safe_dump({**raw, "serving": {**raw.get("serving", {}), "max_request_mb": 1}}))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tasks.use.serve_model",
            "--task",
            "classification",
            "--params",
            str(params),
            "--port",
            str(port),
        ],
        cwd=trained,
        env={**env(), "PYTHONPATH": str(REPO)},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(1)
        image = np.asarray(
            Image.open(sorted(Path(trained, TEST_INPUT["classification"]).rglob("*.png"))[0]).convert("RGB")
        )
        small = json.dumps({"inputs": image[None].tolist()}).encode()
        status, reply = raw_post(port, {"Content-Length": len(small), "Connection": "close"}, small)
        assert status == 200 and len(json.loads(reply)["predictions"]) == 1  # under the limit: answered as before
        big = json.dumps({"inputs": np.repeat(image[None], 200, axis=0).tolist()}).encode()
        assert len(big) > 1024 * 1024
        status, reply = raw_post(port, {"Content-Length": len(big), "Connection": "close"}, big)
        assert status == 413 and b"serving.max_request_mb" in reply and b"[[" not in reply  # the input is not echoed
        status, _ = raw_post(port, {"Content-Length": 200 * 1024 * 1024})  # declared: refused before any byte is read
        assert status == 413
        chunked = (
            b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (big[:600_000], big[600_000:])) + b"0\r\n\r\n"
        )
        status, _ = raw_post(port, {"Transfer-Encoding": "chunked", "Connection": "close"}, chunked)
        assert status == 413  # no declared length: counted while it arrives
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.e2e
def test_mlflow_models_predict_gives_the_same_class_as_the_predict_command(trained, monkeypatch, tmp_path):
    monkeypatch.chdir(trained)
    files = sorted(Path(TEST_INPUT["classification"]).rglob("*.png"))[:1]
    want = predicted_rows(trained, "classification", files, tmp_path)[0]
    (tmp_path / "input.json").write_text(
        json.dumps({"inputs": np.asarray(Image.open(files[0]).convert("RGB"))[None].tolist()})
    )
    result = subprocess.run(
        [
            MLFLOW,
            "models",
            "predict",
            "-m",
            "models:/cv-classification@champion",
            "-i",
            str(tmp_path / "input.json"),
            "-t",
            "json",
            "-o",
            str(tmp_path / "out.json"),
            "--env-manager",
            "local",
        ],
        cwd=trained,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    got = got["predictions"] if isinstance(got, dict) else got
    assert got[0]["class"] == want["class"] and got[0]["score"] == pytest.approx(want["score"], abs=1e-5)
