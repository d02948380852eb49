"""One bad-input suite for every format the pipeline reads (ImageFolder, mask folders, COCO, Pascal VOC,
instance folders) and for the stage's own state (resume checkpoints, the stage lock).

Every case runs the CLI (``python -m tasks <stage> --task <task>``) on tiny generated data and asserts what a
user sees: exit code 1, the file or key named on stderr, no Python traceback, no leftover stage output or
temporary folder, and no MLflow run left RUNNING. Add a case here for every new format or rule.

Starting Python with torch, MLflow and great-expectations takes 10-25 s on a busy 2-core machine, so most
cases call the CLI's ``main`` in this process (an escaping exception fails the test, as a traceback would);
the cases marked ``subprocess`` run ``python -m tasks`` for real.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

from tests.conftest import REPO
from tests.detection_helpers import coco_to_voc

# ---------------------------------------------------------------- bad files


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A valid small PNG whose header declares side x side pixels (a decompression bomb)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", side, side)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # the chunk's CRC over type + data
    path.write_bytes(bytes(data))
    return path


def link_outside(victim: Path, root: Path) -> Path:
    """Replace ``victim`` with a symlink to a copy of it outside the dataset (same content: only the link is bad)."""
    outside = root / "outside" / f"{victim.parent.name}_{victim.name}"
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(victim, outside)
    victim.unlink()
    victim.symlink_to(outside)
    return victim


def rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


class Evil:
    """Runs a shell command when unpickled: what a planted checkpoint could do with weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------- cases


@dataclass
class Case:
    task: str
    stage: str
    setup: Callable  # (project) -> (overrides, [strings stderr must name])
    subprocess: bool = False


def first(folder: Path, pattern: str = "*.png") -> Path:
    return sorted(folder.glob(pattern))[0]


def imagefolder_bomb(p):
    f = bomb_png(p.classification / "train" / "circle" / "bomb.png")
    return {}, [rel(f, p.root), "image width within [16, 4096]"]


def imagefolder_oversized(p):
    f = p.classification / "train" / "square" / "big.png"
    Image.new("RGB", (200, 40), "white").save(f)
    return {"tasks.classification.data.max_size": 128}, [rel(f, p.root), "image width within [16, 128]"]


def imagefolder_symlink(p):
    f = link_outside(first(p.classification / "train" / "star"), p.root)
    return {"tasks.classification.data.follow_symlinks": False}, [
        rel(f, p.root),
        "no file links outside the dataset folder",
    ]


def imagefolder_truncated(p):
    f = first(p.classification / "val" / "circle")
    f.write_bytes(f.read_bytes()[:60])
    return {}, [rel(f, p.root), "every file decodes as an image"]


SEG = {"tasks.segmentation.image_size": 32, "tasks.segmentation.model.width": 8}


def masks_bomb_image(p):
    f = bomb_png(first(p.shapes / "scenes" / "images" / "train"))
    return SEG, [rel(f, p.root), "image width within [16, 4096]"]


def masks_bomb_mask(p):
    f = bomb_png(first(p.shapes / "scenes" / "masks" / "val"))
    return SEG, [rel(f, p.root), "every mask decodes"]


def masks_symlink(p):
    f = link_outside(first(p.shapes / "scenes" / "masks" / "train"), p.root)
    return {**SEG, "tasks.segmentation.data.follow_symlinks": False}, [rel(f, p.root), "no file links outside"]


def coco_edit(p, edit):
    path = p.shapes / "scenes" / "annotations" / "train.json"
    coco = json.loads(path.read_text())
    edit(coco)
    path.write_text(json.dumps(coco))
    return coco


def coco_dotdot(p):
    coco = coco_edit(p, lambda c: c["images"][0].update(file_name="../../outside.png"))
    return {}, [f"image {coco['images'][0]['id']} (../../outside.png)", "file name stays inside the dataset folder"]


def coco_absolute(p):
    coco_edit(p, lambda c: c["images"][1].update(file_name="/etc/passwd"))
    return {}, ["(/etc/passwd)", "file name stays inside the dataset folder"]


def coco_bomb(p):
    f = bomb_png(first(p.shapes / "scenes" / "images" / "train"))
    return {}, [f.name, "image file decodes"]


def coco_symlink(p):
    f = link_outside(first(p.shapes / "scenes" / "images" / "val"), p.root)
    return {"tasks.detection.data.follow_symlinks": False}, [rel(f, p.root), "no file links outside"]


def voc(p, **extra):
    coco_to_voc(p.shapes / "scenes", p.root / "voc")
    return {
        "tasks.detection.data.format": "voc",
        "tasks.detection.data.path": "voc",
        "tasks.detection.data.options": {"annotations": "Annotations", "images": "JPEGImages"},
        **extra,
    }


def voc_bomb(p):
    o = voc(p)
    f = bomb_png(first(p.root / "voc" / "JPEGImages", "train_*.png"))
    return o, [f.name, "image file decodes"]


def voc_symlink(p):
    o = voc(p, **{"tasks.detection.data.follow_symlinks": False})
    f = link_outside(first(p.root / "voc" / "JPEGImages", "val_*.png"), p.root)
    return o, [rel(f, p.root), "no file links outside"]


def voc_dotdot(p):
    o = voc(p)
    lst = p.root / "voc" / "ImageSets" / "Main" / "test.txt"
    lst.write_text("../../escape\n" + lst.read_text())
    return o, ["../../escape", "file name stays inside the dataset folder"]


def folders(p, **extra):
    from tests.test_instance_segmentation import coco_to_instance_folders

    coco_to_instance_folders(p.shapes / "scenes", p.root / "cells")
    return {
        "tasks.instance_segmentation.data.format": "instance_folders",
        "tasks.instance_segmentation.data.path": "cells",
        "tasks.instance_segmentation.data.options": {"class_name": "cell"},
        **extra,
    }


def folders_bomb(p):
    o = folders(p)
    folder = first(p.root / "cells" / "train", "*")
    bomb_png(first(folder / "images"))
    return o, [rel(folder, p.root), "every image decodes"]  # this layout names the image's folder


def folders_symlink(p):
    o = folders(p, **{"tasks.instance_segmentation.data.follow_symlinks": False})
    f = link_outside(first(first(p.root / "cells" / "val", "*") / "masks"), p.root)
    return o, [rel(f, p.root), "no file links outside"]


# baseline cases: tiny and quick (no normalisation statistics, no overfit check, one epoch)
QUICK = {
    "tasks.classification.normalization": "none",
    "tasks.classification.overfit_check.enabled": False,
    "tasks.classification.train.epochs": 1,
}
CKPT = Path("checkpoints/classification/baseline/last.pt")


def plant(p, obj) -> None:
    (p.root / CKPT).parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, p.root / CKPT)
    for path, text in (
        (p.root / "outputs/classification/baseline/metrics.json", '{"earlier": 1}\n'),
        (p.root / "models/classification/baseline/model.pt", "earlier model"),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)  # an earlier run's outputs: must survive untouched


def malicious_checkpoint(p):
    plant(p, {"fingerprint": "x", "epoch": 1, "payload": Evil(p.root / "PWNED")})
    return QUICK, [str(CKPT), "weights_only=True"]


def strict_resume_mismatch(p):
    plant(p, {"fingerprint": "other", "fingerprint_parts": {"settings": "other", "seed": "42"}, "epoch": 1})
    return {**QUICK, "tasks.classification.train.resume": "strict"}, [
        str(CKPT),
        "train.resume: strict",
        "the task's settings",
    ]


CASES = {
    "imagefolder-bomb": Case("classification", "validate", imagefolder_bomb, subprocess=True),
    "imagefolder-oversized": Case("classification", "validate", imagefolder_oversized),
    "imagefolder-symlink-out": Case("classification", "validate", imagefolder_symlink),
    "imagefolder-truncated": Case("classification", "validate", imagefolder_truncated),
    "maskfolder-bomb-image": Case("segmentation", "validate", masks_bomb_image),
    "maskfolder-bomb-mask": Case("segmentation", "validate", masks_bomb_mask),
    "maskfolder-symlink-out": Case("segmentation", "validate", masks_symlink),
    "coco-dotdot-file-name": Case("detection", "validate", coco_dotdot),
    "coco-absolute-file-name": Case("detection", "validate", coco_absolute),
    "coco-bomb": Case("detection", "validate", coco_bomb),
    "coco-symlink-out": Case("detection", "validate", coco_symlink),
    "voc-bomb": Case("detection", "validate", voc_bomb),
    "voc-symlink-out": Case("detection", "validate", voc_symlink),
    "voc-dotdot-id": Case("detection", "validate", voc_dotdot),
    "instance-folders-bomb": Case("instance_segmentation", "validate", folders_bomb),
    "instance-folders-symlink-out": Case("instance_segmentation", "validate", folders_symlink),
    "checkpoint-malicious-pickle": Case("classification", "baseline", malicious_checkpoint, subprocess=True),
    "checkpoint-strict-mismatch": Case("classification", "baseline", strict_resume_mismatch),
}


def cli(root: Path, stage: str, task: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "tasks", stage, "--task", task, "--params", "params.yaml"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def runs_of(pid: int, since_ms: int = 0) -> list:
    import mlflow

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    return [
        r
        for e in client.search_experiments()
        for r in client.search_runs([e.experiment_id], filter_string=f"tags.`cv.pid` = '{pid}' and tags.kind = 'stage'")
        if r.info.start_time >= since_ms
    ]


def run_cli(root: Path, case: Case, capfd) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, pid that owns the stage's MLflow runs)."""
    if case.subprocess:
        proc = cli(root, case.stage, case.task)
        out, err = proc.communicate(timeout=300)
        return proc.returncode, out, err, proc.pid
    from tasks.cli import main

    capfd.readouterr()
    code = main([case.stage, "--task", case.task, "--params", "params.yaml"])
    out, err = capfd.readouterr()
    return code, out, err, os.getpid()


def leftovers(root: Path) -> list[Path]:
    return [p for top in ("outputs", "models", "checkpoints", "data") for p in (root / top).rglob("*.tmp-*")]


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for top in ("outputs", "models")
        for p in (root / top).rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.e2e) if c.subprocess else n for n, c in CASES.items()]
)
def test_bad_input_stops_with_the_file_and_rule(project, name, capfd):
    import time

    case = CASES[name]
    overrides, named = case.setup(project)
    project.params(**overrides)
    before = snapshot(project.root)
    t0 = int(time.time() * 1000) - 1
    code, out, err, pid = run_cli(project.root, case, capfd)
    assert code == 1, f"exit {code}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    for text in named:
        assert text in err, f"{text!r} not named in stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert not leftovers(project.root)
    runs = runs_of(pid, t0)
    assert runs and all(r.info.status == "FAILED" for r in runs), [r.info.status for r in runs]
    after = snapshot(project.root)
    if case.stage == "validate":  # the report is the validate stage's output; nothing downstream appears
        assert set(after) - set(before) <= {
            f"outputs/{case.task}/validate/{f}" for f in os.listdir(project.root / f"outputs/{case.task}/validate")
        }
        assert not (project.root / "models").exists()
    else:  # an earlier run's outputs untouched, the checkpoint kept for the user to inspect
        assert after == before
        assert (project.root / CKPT).exists()
    assert not (project.root / "PWNED").exists()  # nothing ran from the planted checkpoint


@pytest.mark.e2e
def test_a_second_run_of_the_same_stage_stops_naming_the_holder(project):
    from tasks.training import runstate

    project.params(**QUICK)
    os.chdir(project.root)
    with runstate.stage_lock("classification", "baseline"):
        proc = cli(project.root, "baseline", "classification")
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert f"held by pid {os.getpid()}" in err and "already running" in err and "since " in err
    assert "Traceback" not in err
    assert not runs_of(proc.pid)  # stopped before it opened an MLflow run
    assert not (project.root / "models").exists() and not leftovers(project.root)


def test_links_out_of_the_dataset_are_followed_and_reported_by_default(project):
    from tasks import validate

    victim = link_outside(first(project.classification / "train" / "star"), project.root)
    report = validate.run("classification", project.params())
    assert report["success"]
    assert any(
        rel(victim, project.root) in n and "followed: data.follow_symlinks is true" in n for n in report["notes"]
    )
