"""A real `mlflow server` process on 127.0.0.1 and a headless Chromium (the distribution's package)
to look at its UI: what the browser test and the README's screenshot use."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(store_uri: str, artifact_root: Path, log: Path, timeout: float = 120) -> Iterator[str]:
    """``mlflow server`` against ``store_uri``; yields its base URL once it answers /health."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [
        str(mlflow),
        "server",
        "--backend-store-uri",
        store_uri,
        "--default-artifact-root",
        str(artifact_root),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn/gunicorn workers
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)


def chromium_args(
    chromium: str, profile: Path, width: int = 1600, height: int = 900, budget_ms: int = 30000
) -> list[str]:
    # --no-sandbox: CI runs as root; --virtual-time-budget: let the single-page app fetch and render
    return [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        f"--virtual-time-budget={budget_ms}",
    ]


def dump_dom(chromium: str, url: str, profile: Path, **kw) -> str:
    result = subprocess.run(
        [*chromium_args(chromium, profile, **kw), "--dump-dom", url], capture_output=True, text=True, timeout=180
    )
    return result.stdout


def screenshot(chromium: str, url: str, path: Path, profile: Path, **kw) -> Path:
    subprocess.run(
        [*chromium_args(chromium, profile, **kw), f"--screenshot={path}", url],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    return path
