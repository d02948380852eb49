"""Stage 0: write the embedded synthetic shapes data (all four tasks' formats)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cv_models.data import shapes
from tasks.config import load_params
from tasks.paths import atomic_dir


def run(params_path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> dict:
    params = load_params(params_path, overrides, check_tasks=False)  # reads shapes only; validate checks each task
    cfg = params.shapes
    out = Path(cfg.out_dir)
    with atomic_dir(out) as tmp:
        summary = shapes.generate(tmp, cfg)
    print(f"[generate] wrote {out}: {summary}")
    return summary
