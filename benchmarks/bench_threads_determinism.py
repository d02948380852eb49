"""Classification training with N torch threads: seconds per epoch and whether separate runs give bitwise-equal
weights (the trade train.num_threads makes between speed and repeatability).

    python benchmarks/bench_threads_determinism.py [--threads 1 2] [--runs 2] [--epochs 2]

Each run is a fresh process (thread pools and kernel choices start anew), on synthetic shapes written to a
temporary folder (960 images at 48 px), with params.yaml's classification model and augmentations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(folder: Path, threads: int, epochs: int, deterministic: bool) -> dict:
    sys.path.insert(0, str(REPO))
    os.chdir(folder)
    from cv_models import get_task
    from cv_models.data import shapes
    from tasks.config import load_params
    from tasks.training import engine
    from tasks.training.seeding import seed_everything, state_sha256

    t = "tasks.classification."
    params = load_params(
        REPO / "params.yaml",
        {
            "shapes.image_size": 48,
            "shapes.classification.num_images": 960,
            t + "train.epochs": epochs,
            t + "train.num_threads": threads,
            t + "train.deterministic": deterministic,
            t + "normalization": "none",
            t + "train.track_train_metric": False,
        },
    )
    if not Path("data/shapes/classification").exists():
        shapes.generate(Path("data/shapes"), params.shapes)
    cfg = params.task("classification")
    task = get_task("classification", cfg)
    seed_everything(0)
    model = task.build_model()
    train = task.dataset("train", task.train_transforms(cfg.augment, None))
    val = task.dataset("val", task.eval_transforms(None))
    start = time.perf_counter()
    result = engine.fit(task, model, train, val, cfg.train, 0, Path(f"model-{os.getpid()}.pt"), desc="bench")
    return {
        "threads": threads,
        "deterministic": deterministic,
        "s_per_epoch": round((time.perf_counter() - start) / epochs, 2),
        "val_accuracy": result.best_metrics["accuracy"],
        "weights_sha256": state_sha256(model)[:16],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--nondeterministic", action="store_true", help="train.deterministic: false")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_run(Path(args.child[0]), int(args.child[1]), args.epochs, not args.nondeterministic)))
        return
    with tempfile.TemporaryDirectory() as folder:
        rows = []
        for _ in range(args.runs):
            for threads in args.threads:
                cmd = [sys.executable, __file__, "--child", folder, str(threads), "--epochs", str(args.epochs)]
                cmd += ["--nondeterministic"] if args.nondeterministic else []
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                rows.append(json.loads(out))
                print(out, flush=True)
        for threads in args.threads:
            hashes = {r["weights_sha256"] for r in rows if r["threads"] == threads}
            print(
                f"{threads} thread(s): {'bitwise-equal' if len(hashes) == 1 else 'DIFFERENT'} weights over {args.runs} runs"
            )


if __name__ == "__main__":
    main()
