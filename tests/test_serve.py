"""The registered champion served by `mlflow models serve` (127.0.0.1, local env) answers over HTTP with the
same predictions as `python -m tasks predict`; `mlflow models predict` too. Classification and detection."""
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

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.test_use_model import TEST_INPUT, train_project

pytestmark = pytest.mark.e2e
SERVED = ("classification", "detection")
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_shapes):
    root = tmp_path_factory.mktemp("serve")
    before = os.getcwd()
    os.chdir(root)
    try:
        yield train_project(root, tiny_shapes, SERVED)
    finally:
        os.chdir(before)


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
        proc = subprocess.Popen([MLFLOW, "models", "serve", "-m", f"models:/cv-{task.replace('_', '-')}@champion",
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                                cwd=trained, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())["predictions"]

        return post

    yield start
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def predicted_rows(trained: Path, task: str, files: list[Path], out: Path) -> list[dict]:
    from tasks import predict

    for k, f in enumerate(files):  # one file per call: image ids start at 1, as in a one-image request
        predict.run(task, "models:/cv-" + task.replace("_", "-") + "@champion", str(f), out / str(k))
    if task == "classification":
        return [pd.read_csv(out / str(k) / "predictions.csv").drop(columns=["file"]).iloc[0].to_dict() for k in range(len(files))]
    return [json.loads((out / str(k) / "coco_results.json").read_text()) for k in range(len(files))]


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


def test_mlflow_models_predict_gives_the_same_class_as_the_predict_command(trained, monkeypatch, tmp_path):
    monkeypatch.chdir(trained)
    files = sorted(Path(TEST_INPUT["classification"]).rglob("*.png"))[:1]
    want = predicted_rows(trained, "classification", files, tmp_path)[0]
    (tmp_path / "input.json").write_text(json.dumps({"inputs": np.asarray(Image.open(files[0]).convert("RGB"))[None].tolist()}))
    result = subprocess.run([MLFLOW, "models", "predict", "-m", "models:/cv-classification@champion", "-i", str(tmp_path / "input.json"),
                             "-t", "json", "-o", str(tmp_path / "out.json"), "--env-manager", "local"],
                            cwd=trained, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    got = got["predictions"] if isinstance(got, dict) else got
    assert got[0]["class"] == want["class"] and got[0]["score"] == pytest.approx(want["score"], abs=1e-5)
