"""The data version of a task: a digest of what the validate stage read, per split and overall.

The validate stage builds pandas tables of every sample (and annotation). Their rows, plus the
content hash of every file they name, make a digest that changes when any image or label changes,
whether or not the data is under DVC. The validate stage writes it into its ``report.json``
(``data_version``); resume fingerprints, MLflow dataset inputs and the Model Registry read it back
with :func:`read_data_version`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from tasks.paths import outputs

ALL = "all"


def _file_sha256(path: str, cache: dict[str, str]) -> str:
    if path not in cache:
        p = Path(path)
        cache[path] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "missing"
    return cache[path]


def _rows_text(df: pd.DataFrame, file_hashes: dict[str, str]) -> str:
    df = df.copy()
    if "path" in df.columns and "sha256" not in df.columns:  # tables that name files without hashing them
        df["sha256"] = [_file_sha256(str(p), file_hashes) for p in df["path"]]
    df = df.reindex(sorted(df.columns), axis=1)
    return df.sort_values(list(df.columns)).to_csv(index=False) if len(df) else ""


def digest_tables(tables: dict[str, pd.DataFrame]) -> dict[str, dict]:
    """``{split: {"digest": sha256, "n_samples": n}}`` for every split, and ``all`` over every split.

    ``n_samples`` counts the rows of the first table (the samples); the digest covers every table.
    """
    if not tables:
        return {ALL: {"digest": "unknown", "n_samples": 0}}
    file_hashes: dict[str, str] = {}
    first = next(iter(tables.values()))
    splits = sorted({str(s) for df in tables.values() if "split" in df.columns for s in df["split"].unique()})
    out: dict[str, dict] = {}
    for split in [*splits, ALL]:
        h = hashlib.sha256()
        for name in sorted(tables):
            df = tables[name]
            if split != ALL and "split" in df.columns:
                df = df[df["split"].astype(str) == split]
            h.update(name.encode() + b"\n" + _rows_text(df.astype(str), file_hashes).encode())
        n = (
            len(first)
            if split == ALL or "split" not in first.columns
            else int((first["split"].astype(str) == split).sum())
        )
        out[split] = {"digest": h.hexdigest(), "n_samples": n}
    return out


def read_data_version(task_name: str, split: str = ALL) -> dict:
    """The validate stage's digest for ``split`` (``{"digest": "unknown", "n_samples": 0}`` before it ran)."""
    report = outputs(task_name, "validate") / "report.json"
    if report.exists():
        versions = json.loads(report.read_text()).get("data_version") or {}
        if split in versions:
            return versions[split]
    return {"digest": "unknown", "n_samples": 0}
