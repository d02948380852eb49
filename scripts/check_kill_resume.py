"""Kill a training stage with ``kill -9`` at a random point, run it again, and compare its model and metrics
with an uninterrupted run's: they must be equal bit for bit, with at most the interrupted epoch redone.

    .venv/bin/python scripts/check_kill_resume.py --task detection            # one task, tiny settings
    .venv/bin/python scripts/check_kill_resume.py --task all --seed 3          # the four tasks

Runs the real CLI (``python -m tasks``) in a throw-away folder on tiny generated data with its own MLflow
store; prints one JSON line per task. Exit code 1 if any task differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# tiny data and models: seconds per epoch on a 2-core CPU
COMMON = {
    "shapes.image_size": 32,
    "shapes.classification": {"num_images": 240, "scale": [0.5, 0.9], "clutter": 0, "noise": 4},
    "shapes.scenes": {"num_images": 24, "image_size": 64, "min_objects": 1, "max_objects": 3, "scale": [0.2, 0.45]},
}
TASKS = {
    "classification": {"image_size": 32, "train.epochs": 4, "train.batch_size": 16, "train.num_threads": 1},
    "segmentation": {
        "image_size": 32,
        "model.width": 8,
        "train.epochs": 3,
        "train.batch_size": 4,
        "train.num_threads": 1,
    },
    "detection": {
        "image_size": 64,
        "model.options.anchor_size": 12,
        "train.epochs": 3,
        "train.batch_size": 4,
        "train.eval_batch_size": 8,
        "train.num_threads": 1,
    },
    "instance_segmentation": {
        "image_size": 64,
        "model.width": 8,
        "model.options.fpn_channels": 32,
        "model.options.anchor_size": 8,
        "train.epochs": 3,
        "train.batch_size": 4,
        "train.num_threads": 1,
    },
}
# the stage under test trains only: no overfit check (it runs before training and is not resumable)
STAGE_SETTINGS = {"overfit_check.enabled": False, "train.track_train_metric": True}


def overrides(task: str) -> dict:
    out = dict(COMMON)
    for key, value in {**TASKS[task], **STAGE_SETTINGS}.items():
        out[f"tasks.{task}.{key}"] = value
    return out


def cli(folder: Path, env: dict, stage: str, task: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tasks", stage, "--task", task],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"stage failed ({proc.returncode}):\n{err[-3000:]}")
    return out


def wait_for(ckpt: Path, proc: subprocess.Popen) -> float:
    """Wait for the first resume checkpoint (the first epoch done); returns when it appeared."""
    while not ckpt.exists():
        if proc.poll() is not None:
            raise SystemExit(f"stage ended before its first checkpoint:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.02)
    return time.time()


def results(folder: Path, task: str) -> tuple[dict, bytes, bytes]:
    model = torch.load(folder / f"models/{task}/baseline/model.pt", weights_only=True)["model"]
    out = folder / f"outputs/{task}/baseline"
    return model, (out / "metrics.json").read_bytes(), (out / "history.csv").read_bytes()


def check(task: str, rng: random.Random, keep: Path | None) -> dict:
    from cv_models.data import shapes
    from tasks.config import load_params, load_raw

    folder = Path(tempfile.mkdtemp(prefix=f"kill-resume-{task}-")) if keep is None else keep / task
    folder.mkdir(parents=True, exist_ok=True)
    raw = load_raw(REPO / "params.yaml", overrides(task))
    raw["tasks"] = {task: raw["tasks"][task]}
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(folder / "params.yaml")
    shapes.generate(folder / params.shapes.out_dir, params.shapes)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "CV_MLFLOW_ARTIFACT_ROOT": str(folder / "mlartifacts"),
        "CV_PIPELINE_RUN_ID": "kill-resume",
        "GX_ANALYTICS_ENABLED": "False",
    }
    for stage in ("validate", "normstats"):
        finish(cli(folder, env, stage, task))

    ckpt = folder / f"checkpoints/{task}/baseline/last.pt"
    epochs = TASKS[task]["train.epochs"]
    proc = cli(folder, env, "baseline", task)  # the uninterrupted reference; its epoch time sets the kill window
    first = wait_for(ckpt, proc)
    finish(proc)
    per_epoch = (time.time() - first) / max(epochs - 1, 1)
    reference = results(folder, task)
    shutil.rmtree(folder / f"models/{task}/baseline")
    shutil.rmtree(folder / f"outputs/{task}/baseline")

    # a random point of training after the first epoch (a kill before it simply starts afresh)
    proc = cli(folder, env, "baseline", task)
    wait_for(ckpt, proc)
    delay = rng.uniform(0, per_epoch * (epochs - 1.3))
    end = time.time() + delay
    while time.time() < end and proc.poll() is None:
        time.sleep(0.02)
    killed = proc.poll() is None
    done_epoch, finished, committed = 0, False, False
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        committed = (folder / f"outputs/{task}/baseline/metrics.json").exists()  # killed after the stage's outputs
        if ckpt.exists():
            ck = torch.load(ckpt, weights_only=True)
            done_epoch, finished = int(ck["epoch"]), bool(ck.get("done"))
    else:
        finish(proc)

    out = finish(cli(folder, env, "baseline", task))
    marker = f"resuming from checkpoints/{task}/baseline/last.pt after epoch "
    resumed_after = int(out.split(marker)[1].split()[0]) if marker in out else 0
    model, metrics, history = results(folder, task)
    same_model = model.keys() == reference[0].keys() and all(torch.equal(model[k], reference[0][k]) for k in model)
    report = {
        "task": task,
        "killed_s_after_epoch_1": round(delay, 1),
        "epoch_s": round(per_epoch, 1),
        "killed": killed,
        "epochs_done_at_kill": done_epoch,
        "resumed_after_epoch": resumed_after,
        "training_had_finished": finished,
        "outputs_committed_at_kill": committed,
        "epochs_redone": (
            epochs
            if killed and committed and not resumed_after  # checkpoint already dropped
            else max(done_epoch - resumed_after, 0) + (1 if killed and not finished else 0)
        ),
        "same_model_tensors": same_model,
        "same_metrics_json": metrics == reference[1],
        "same_history_csv": history == reference[2],
    }
    report["ok"] = bool(
        same_model and metrics == reference[1] and history == reference[2] and resumed_after == done_epoch
    )
    if keep is None:
        shutil.rmtree(folder, ignore_errors=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="all", choices=["all", *TASKS])
    parser.add_argument("--seed", type=int, default=None, help="seed of the random kill point (default: random)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the work folders here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    ok = True
    for task in TASKS if args.task == "all" else [args.task]:
        report = check(task, rng, args.keep)
        ok &= report["ok"]
        print(json.dumps(report), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
