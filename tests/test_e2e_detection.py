"""Detection end to end on tiny synthetic scenes: `dvc repro` in a fresh git repo, and the Prefect
deployment served against a real Prefect server and started with the `prefect` CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.conftest import REPO
from tests.test_e2e_classification import _env, dvc, make_repo

pytestmark = pytest.mark.e2e

# only the detection task (the "tasks" key replaces the whole section), on scenes big enough to learn from
SCENES = {
    "num_images": 80,
    "image_size": 64,
    "min_objects": 1,
    "max_objects": 2,
    "scale": [0.3, 0.5],
    "clutter": 0,
    "noise": 4,
}
TINY_DETECTION = {
    "image_size": 64,
    "train": {"epochs": 5, "batch_size": 4, "eval_batch_size": 8},
    "overfit_check": {"steps": 10, "max_loss": 10.0},
    "preview_samples": 4,
    "options": {"report_images": 2},
    "model": {"options": {"anchor_size": 12}},
    # mixup and mosaic off (tests/test_detection_model.py checks them): with them, 5 epochs left the augmented
    # model at test mAP@.5 0.053 on an AMD EPYC, a hair above the 0.05 margin; without them 0.325
    "augment": {"mixup": {"enabled": False}, "mosaic": {"enabled": False}},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def detection_only(**train) -> dict:
    section = yaml.safe_load((REPO / "params.yaml").read_text())["tasks"]["detection"]
    section = _merge(section, TINY_DETECTION)
    section["train"].update(train)
    return {"tasks": {"detection": section}, "shapes.scenes": SCENES}


def evaluation(folder: Path) -> dict:
    return json.loads((folder / "outputs/detection/evaluate/metrics.json").read_text())


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("e2e-det") / "repo", **detection_only())
    result = dvc(repo, "repro", CV_PIPELINE_RUN_ID="e2e-det-dvc")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return repo


def test_dvc_repro_beats_the_dummy_and_exports_coco_results(dvc_repo):
    m = evaluation(dvc_repo)
    assert m["n_test"] == 12
    assert m["augmented"]["map50"] > m["dummy"]["map50"] + 0.05
    assert m["baseline"]["map50"] > m["dummy"]["map50"] + 0.05
    for k in ("map", "map50", "map75"):
        assert 0 <= m["augmented"][k] <= 1
    details = dvc_repo / "outputs/detection/evaluate/details"
    gt = json.loads((details / "ground_truth_test.json").read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    assert len(sizes) == 12 and gt["annotations"]
    for model in ("dummy", "baseline", "augmented"):  # COCO results on the test images, in their own pixels
        rows = json.loads((details / f"predictions_{model}.json").read_text())
        assert model == "dummy" or rows, model
        for r in rows:
            x, y, w, h = r["bbox"]
            width, height = sizes[r["image_id"]]
            assert 0 <= r["score"] <= 1 and r["category_id"] in {c["id"] for c in gt["categories"]}, r
            assert w >= 0 and h >= 0 and -1 <= x <= x + w <= width + 1 and -1 <= y <= y + h <= height + 1, (
                r,
                width,
                height,
            )
    per_class = pd.read_csv(details / "per_class_augmented.csv")
    assert sorted(per_class["class"]) == sorted(c["name"] for c in gt["categories"])
    assert per_class["n_boxes"].sum() == len(gt["annotations"])
    for name, ap50 in zip(
        per_class["class"], per_class["ap50"]
    ):  # the metrics' per-class AP, whose mean is the headline
        assert ap50 == pytest.approx(m["augmented"][f"ap50/{name}"], abs=1e-9)
    assert per_class.loc[per_class["n_boxes"] > 0, "ap50"].mean() == pytest.approx(m["augmented"]["map50"], abs=1e-6)
    for picture in (
        details / "predictions_augmented.png",
        dvc_repo / "outputs/detection/augmented/augment_preview.png",
    ):
        with Image.open(picture) as im:
            assert im.width >= 96 and im.height >= 96 and len(set(im.convert("L").getdata())) > 2, picture
    assert "up to date" in dvc(dvc_repo, "status").stdout


def test_reported_map_equals_pycocotools_recomputed_from_the_export(dvc_repo):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    details = dvc_repo / "outputs/detection/evaluate/details"
    gt = COCO(str(details / "ground_truth_test.json"))
    for model in ("baseline", "augmented"):
        ev = COCOeval(gt, gt.loadRes(str(details / f"predictions_{model}.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        reported = evaluation(dvc_repo)[model]
        assert reported["map"] == pytest.approx(max(ev.stats[0], 0), abs=1e-9)
        assert reported["map50"] == pytest.approx(max(ev.stats[1], 0), abs=1e-9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{what}: not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen | None) -> None:
    """Stop a process started here and everything in its own process group."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def test_prefect_deployment_run_through_the_cli(tmp_path):
    """`prefect deployment run train-detection/default --param epochs=2 --watch` against a real server."""
    import mlflow

    repo = make_repo(tmp_path / "served", **detection_only())
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=api,
        PYTHONPATH=str(repo),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
    )
    env.pop("CV_PIPELINE_RUN_ID", None)
    server = serve = None
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    try:
        server = subprocess.Popen(
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=server_log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait(
            lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200,
            120,
            "prefect server",
            server,
            server_log,
        )
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.serve", "params.yaml"],
            cwd=repo,
            env=env,
            stdout=serve_log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def deployed() -> bool:
            req = urllib.request.Request(
                f"{api}/deployments/filter", data=b"{}", headers={"Content-Type": "application/json"}
            )
            return any(d["name"] == "default" for d in json.loads(urllib.request.urlopen(req, timeout=5).read()))

        _wait(deployed, 90, "flows.serve", serve, serve_log)
        run = subprocess.run(
            [
                "prefect",
                "deployment",
                "run",
                "train-detection/default",
                "--param",
                "epochs=2",
                "--watch",
                "--watch-timeout",
                "400",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=450,
        )
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-3000:] + serve_log.read_text()[-3000:]
        assert "Completed" in output, output[-2000:]
        flow_run_id = next(line.split()[-1] for line in output.splitlines() if "UUID" in line)
        # the evaluate stage's comparison, published as a Prefect artifact of this flow run
        req = urllib.request.Request(
            f"{api}/artifacts/filter",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"artifacts": {"key": {"any_": ["detection-evaluation"]}}}).encode(),
        )
        artifacts = json.loads(urllib.request.urlopen(req, timeout=10).read())
        assert [a["flow_run_id"] for a in artifacts] == [flow_run_id], artifacts
        assert "map50" in artifacts[0]["data"]
        # the served predict-detection deployment: the new model on the test images
        run = subprocess.run(
            [
                "prefect",
                "deployment",
                "run",
                "predict-detection/default",
                "--param",
                "input=data/shapes/scenes/images/test",
                "--param",
                f"out={tmp_path / 'predicted'}",
                "--watch",
                "--watch-timeout",
                "200",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=250,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + serve_log.read_text()[-3000:]
        summary = json.loads((tmp_path / "predicted" / "summary.json").read_text())
        assert (
            summary["images"] == 12
            and summary["failed"] == 0
            and (tmp_path / "predicted" / "coco_results.json").exists()
        )
    finally:
        _stop(serve)
        _stop(server)
    m = evaluation(repo)
    assert m["augmented"]["map50"] > m["dummy"]["map50"]
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("cv-detection")
    pipeline_run_id = f"prefect-{flow_run_id}"[:40]  # as flows.pipeline.run_pipeline names it
    runs = client.search_runs([exp.experiment_id], f"tags.pipeline_run_id = '{pipeline_run_id}'")
    stages = {r.data.tags.get("stage"): r for r in runs if r.data.tags.get("kind") == "stage"}
    assert set(stages) == {"validate", "normstats", "baseline", "augmented", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in stages.values())
    # the flow parameter overrode params.yaml and is on record
    assert json.loads(stages["baseline"].data.params["overrides"]) == {"tasks.detection.train.epochs": 2}
    assert stages["baseline"].data.params["train.epochs"] == "2"
