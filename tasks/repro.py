"""``dvc repro`` with several tasks at once: ``python -m tasks repro [--jobs N]`` (what ``make run`` calls).

``dvc repro`` runs one stage at a time, and each training uses one torch thread (``num_threads: 1``, for
bitwise-equal reruns), so on a 2-core machine the second core idles through the main job. The tasks'
chains share only ``generate`` and ``pretrain``, so after those this runs each task's stages in order,
``--jobs`` tasks at a time, with DVC's own ``--wait-for-lock``: DVC releases its repository
lock while a stage's command runs and takes it again to record the result in ``dvc.lock``, so the chains
interleave safely. Each line of output is prefixed with its task. A final plain ``dvc repro`` then finds
everything up to date (or runs what the chains do not cover), so the result is exactly ``dvc repro``'s:
same stages, same ``dvc.lock``, same models (each stage runs alone in its own process, as before).

The longest task starts first, by the training times of the last run when there are any.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from tasks.chain import PER_TASK, SHARED, TRAINED
from tasks.paths import outputs


def task_names(params_path: str | Path = "params.yaml") -> list[str]:
    """The tasks of ``dvc.yaml``'s ``foreach``: the keys of ``tasks:`` in params.yaml."""
    return list(yaml.safe_load(Path(params_path).read_text()).get("tasks") or {})


def last_training_seconds(task: str) -> float:
    """The task's training time in its last run (0 when it has not run): the longest task starts first."""
    total = 0.0
    for stage in TRAINED:
        path = outputs(task, stage) / "timings.json"
        if path.exists():
            total += float(json.loads(path.read_text()).get("train_seconds", 0.0))
    return total


def default_jobs(n_tasks: int) -> int:
    """One task per CPU core (each training uses its own thread), never more than there are tasks."""
    return max(1, min(n_tasks, os.cpu_count() or 1))


def ensure_tracking_store() -> None:
    """The MLflow schema exists before the lanes write to it (two processes creating it at once can race)."""
    from tasks.config import load_params
    from tasks.track.tracking import ensure_store

    ensure_store(load_params("params.yaml"))


def run_dvc(args: list[str], prefix: str, lock: threading.Lock) -> int:
    """One ``dvc`` command, each output line printed with ``prefix``; its exit code."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # lines as they come, not at the end of each stage
    with subprocess.Popen(
        ["dvc", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            with lock:
                print(f"{prefix}{line}", end="", flush=True)
    return proc.returncode


def task_lane(task: str, lock: threading.Lock) -> int:
    """One task's stages in chain order, each ``dvc repro --single-item`` (it runs only when changed): a
    ``dvc repro`` of the last stage would also check ``generate``, whose output folder holds every task's data,
    and DVC refuses to check it while another lane's stage reads from it."""
    for stage in PER_TASK:
        if run_dvc(["--wait-for-lock", "repro", "--single-item", f"{stage}@{task}"], f"[{task}] ", lock):
            return 1
    return 0


def repro(tasks: list[str], jobs: int) -> int:
    """The shared stages, then each task's chain in a lane of its own, then ``dvc repro`` for the rest."""
    lock = threading.Lock()
    if run_dvc(["repro", *SHARED], "", lock):
        return 1
    ensure_tracking_store()
    order = sorted(tasks, key=last_training_seconds, reverse=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        codes = dict(zip(order, pool.map(lambda t: task_lane(t, lock), order)))
    failed = [t for t, code in codes.items() if code]
    if failed:
        print(f"error: dvc repro failed for {', '.join(failed)} (see the lines marked [task] above)", file=sys.stderr)
        return 1
    return 1 if run_dvc(["repro"], "", lock) else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks repro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, help="tasks at once (default: one per CPU core, at most the tasks)")
    args = parser.parse_args(argv)
    tasks = task_names()  # dvc.yaml's foreach reads params.yaml
    jobs = args.jobs or default_jobs(len(tasks))
    if jobs < 1:
        parser.error("--jobs must be at least 1")
    try:
        return repro(tasks, jobs)
    except KeyboardInterrupt:  # Ctrl-C reaches every dvc and stage process too: each stage ends its MLflow run KILLED
        print("error: interrupted; run it again to go on where it stopped", file=sys.stderr)
        return 130
