"""Run-state safety shared by every stage: one writer per task and stage (a lock file), signals that end
the stage cleanly, and clean-up of what killed stages left behind (RUNNING MLflow runs, ``.tmp-*`` folders).

A stage killed with ``kill -9`` cannot clean up after itself; the next stage to start does it instead,
for runs and folders whose owning process is gone (same host, pid no longer alive or reused).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_DIR = Path(".locks")
PID_TAG, HOST_TAG, START_TAG = "cv.pid", "cv.host", "cv.pid_start"  # MLflow run tags naming the owning process
TMP_OWNER = re.compile(r"\.tmp-(\d+)-")  # tasks/paths.py puts the owner's pid into every temporary name


class StageBusy(RuntimeError):
    """The same stage of the same task is already running in this project folder."""


class StageInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT reached a stage. A KeyboardInterrupt, so ``except Exception`` cannot swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


# ---------------------------------------------------------------- processes


def host() -> str:
    return socket.gethostname()


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc``), or "" where unknown.
    A pid alone can be reused by a new process; pid plus start time cannot."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name
    except (OSError, IndexError):
        return ""


def process_alive(pid: int, start: str = "") -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = process_start(pid)
    return not (start and now and now != start)  # same pid, other process: the owner is gone


def owner_tags() -> dict[str, str]:
    """Tags a stage's MLflow run carries so a later stage can tell whether its process is still alive."""
    pid = os.getpid()
    return {PID_TAG: str(pid), HOST_TAG: host(), START_TAG: process_start(pid)}


# ---------------------------------------------------------------- one writer per stage


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


@contextmanager
def stage_lock(task_name: str, stage: str) -> Iterator[Path]:
    """Hold ``.locks/<task>.<stage>.lock`` for the block, or stop at once naming the holder.

    ``flock`` is released by the kernel when the holder dies, even by ``kill -9``: a stale lock file is
    simply taken over. Different tasks and stages use different files and run side by side.
    """
    LOCK_DIR.mkdir(exist_ok=True)
    path = LOCK_DIR / f"{task_name}.{stage}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            h = _read_holder(path)
            raise StageBusy(
                f"stage '{stage}' of task '{task_name}' is already running in this folder: held by pid {h.get('pid', '?')} "
                f"on host {h.get('host', '?')} since {h.get('started', '?')} (lock file {path}). Wait for it to end, or stop "
                f"that process; two runs of one stage would overwrite each other's checkpoint and outputs."
            ) from None
        info = {
            "pid": os.getpid(),
            "host": host(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "stage": stage,
            "task": task_name,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # the file stays (removing it would race with a waiting locker); empty = free
    finally:
        os.close(fd)  # releases the flock


# ---------------------------------------------------------------- signals


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`StageInterrupted` inside the block, so the ``with`` blocks
    around it unwind: the MLflow run ends KILLED and the temporary output folder is removed.
    Only the main thread can own signal handlers; elsewhere (a stage inside a Prefect worker thread)
    this does nothing and the next stage's clean-up handles a killed run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signums}

    def handler(signum, frame):
        for s in signums:  # one interruption at a time: a second signal must not break the clean-up
            signal.signal(s, signal.SIG_IGN)
        raise StageInterrupted(signum)

    for s in signums:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- clean-up of killed stages


def mark_stale_runs(client, note_prefix: str = "") -> list[str]:
    """End every RUNNING run of this store whose owning process (pid tag, same host) is gone, as FAILED
    with a note tag. Runs of other hosts, and runs without the owner tags, are left alone."""
    me, stale = host(), []
    for exp in client.search_experiments():
        for run in client.search_runs(
            [exp.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
        ):
            tags = run.data.tags
            if tags.get(HOST_TAG) != me or not tags.get(PID_TAG, "").isdigit():
                continue
            pid = int(tags[PID_TAG])
            if pid == os.getpid() or process_alive(pid, tags.get(START_TAG, "")):
                continue
            client.set_tag(
                run.info.run_id,
                "cv.note",
                f"{note_prefix}process {pid} on {me} ended without closing this run (killed, e.g. kill -9 or "
                f"out of memory); marked FAILED at {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by pid {os.getpid()}",
            )
            client.set_terminated(run.info.run_id, status="FAILED")
            stale.append(run.info.run_id)
    return stale


def remove_stale_tmp(roots: list[Path], depth: int = 2) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>-*`` folders and files under ``roots`` (``depth`` levels) whose pid is gone."""
    removed = []
    for root in roots:
        if not root.is_dir():
            continue
        patterns = ["/".join(["*"] * level + [".*.tmp-*"]) for level in range(depth + 1)]
        for pattern in patterns:
            for path in root.glob(pattern):
                m = TMP_OWNER.search(path.name)
                if not m or process_alive(int(m.group(1)), _started_before(path)):
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _started_before(path: Path) -> str:
    """ "" (cannot tell) unless the pid's current process started after ``path`` was made: then the pid was
    reused and the owner is gone; return a start value that never matches."""
    try:
        m = TMP_OWNER.search(path.name)
        pid = int(m.group(1))
        ticks = int(process_start(pid) or 0)
        btime = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        started = btime + ticks / os.sysconf("SC_CLK_TCK")
        return "reused" if started > path.lstat().st_mtime + 1 else ""
    except (OSError, ValueError, StopIteration, AttributeError):
        return ""


@contextmanager
def guard(task_name: str, stage: str) -> Iterator[None]:
    """What every stage holds while it runs: signals that unwind it, its lock, and a clean slate
    (temporary folders of killed stages removed; their MLflow runs are closed by tracking.stage_run)."""
    with signals_interrupt(), stage_lock(task_name, stage):
        remove_stale_tmp([Path("outputs"), Path("models"), Path("checkpoints"), Path("data")])
        yield
