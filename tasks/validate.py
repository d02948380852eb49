"""Stage 1: read and check the data before training.

The task builds pandas tables of its samples; a great-expectations suite checks them.
The report (JSON and Markdown) names every failing file and rule; on failure the stage
raises :class:`ValidationFailed`, so the pipeline stops before training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from cv_models.base import Check, DataError
from tasks.paths import atomic_dir, outputs
from tasks.stage import open_stage
from tasks.track.data_version import digest_tables

MAX_LISTED = 50  # files listed per rule in the Markdown summary (the JSON lists all)


class ValidationFailed(RuntimeError):
    pass


def run_checks(checks: list[Check], tables: dict[str, pd.DataFrame]) -> list[dict]:
    """Run the checks as one great-expectations suite per table; one result dict per check."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False, "metric_calculations": False}
    source = context.data_sources.add_pandas("samples")
    results: list[dict] = []
    for table_name in dict.fromkeys(c.table for c in checks):
        table_checks = [c for c in checks if c.table == table_name]
        df = tables[table_name].reset_index(drop=True)
        if df.empty:
            results += [
                {
                    "table": table_name,
                    "rule": c.rule,
                    "expectation": type(c.expectation).__name__,
                    "success": False,
                    "unexpected_count": 0,
                    "failing": [f"table '{table_name}' is empty"],
                }
                for c in table_checks
            ]
            continue
        batch = source.add_dataframe_asset(table_name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"{table_name}_suite"))
        for c in table_checks:
            suite.add_expectation(c.expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=table_name, data=batch, suite=suite)
        )
        keys = sorted({c.key_column for c in table_checks})
        outcome = definition.run(
            batch_parameters={"dataframe": df},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": keys},
        )
        # suite results come back in the order the expectations were added
        for c, res in zip(table_checks, outcome.results):
            failing = [row.get(c.key_column, str(row)) for row in (res.result.get("unexpected_index_list") or [])]
            if not res.success and not failing and res.exception_info and res.exception_info.get("raised_exception"):
                failing = [f"expectation error: {res.exception_info.get('exception_message')}"]
            results.append(
                {
                    "table": table_name,
                    "rule": c.rule,
                    "expectation": res.expectation_config.type,
                    "success": bool(res.success),
                    "unexpected_count": int(res.result.get("unexpected_count") or 0),
                    "failing": failing,
                }
            )
    return results


PATH_COLUMNS = ("path", "mask_path", "mask", "png")  # columns naming a file of the dataset, in any format's tables
SYMLINK_RULE = "no file links outside the dataset folder (data.follow_symlinks: false)"


def outside_links(tables: dict[str, pd.DataFrame], root: Path) -> list[str]:
    """Files listed inside the dataset folder that resolve outside it (a symlink, or a linked folder on the way).
    Names outside the folder to begin with ('..', absolute) are each format's own rule."""
    base, real = Path(os.path.abspath(root)), root.resolve()
    found = {}
    for df in tables.values():
        for col in (c for c in PATH_COLUMNS if c in df.columns):
            for value in df[col].dropna().astype(str).unique():
                p = Path(value)
                absolute = Path(os.path.abspath(p))
                if base not in absolute.parents or not (p.is_symlink() or p.exists()):
                    continue
                target = p.resolve()
                if target != real and real not in target.parents:
                    found[value] = f"{value}: links to {target}, outside the dataset folder {root}"
    return list(found.values())


def symlink_policy(tables: dict[str, pd.DataFrame], root: Path, follow: bool) -> tuple[list[dict], list[str]]:
    """One policy for every format: links out of the dataset are followed and noted, or refused by a rule."""
    links = outside_links(tables, root)
    if follow:  # a dataset checked out as links (e.g. DVC's symlink cache) is one note, not thousands
        notes = [f"{line} (followed: data.follow_symlinks is true)" for line in links[:MAX_LISTED]]
        if len(links) > MAX_LISTED:
            notes.append(f"... and {len(links) - MAX_LISTED} more files linking outside {root} (followed)")
        return [], notes
    return [
        {
            "table": "-",
            "rule": SYMLINK_RULE,
            "expectation": "symlink policy",
            "success": not links,
            "unexpected_count": len(links),
            "failing": links,
        }
    ], []


def _markdown(task_name: str, report: dict) -> str:
    status = "PASSED" if report["success"] else "FAILED"
    lines = [f"# Data validation: {task_name} — {status}", "", f"Samples checked: {report['n_samples']}", ""]
    lines += ["| rule | table | result | failing |", "|---|---|---|---|"]
    for r in report["checks"]:
        lines.append(f"| {r['rule']} | {r['table']} | {'ok' if r['success'] else 'FAIL'} | {len(r['failing'])} |")
    for r in (r for r in report["checks"] if not r["success"]):
        lines += ["", f"## FAIL: {r['rule']}", ""]
        lines += [f"- {f}" for f in r["failing"][:MAX_LISTED]]
        if len(r["failing"]) > MAX_LISTED:
            lines.append(f"- ... and {len(r['failing']) - MAX_LISTED} more (see report.json)")
    if report["notes"]:
        lines += ["", "## Notes (reported, not fatal)", ""] + [f"- {n}" for n in report["notes"][:MAX_LISTED]]
    for name, summary in report.get("summaries", {}).items():
        lines += ["", f"## {name}", "", summary]
    return "\n".join(lines) + "\n"


def failure_summary(report: dict) -> str:
    parts = []
    for r in report["checks"]:
        if not r["success"]:
            shown = ", ".join(map(str, r["failing"][:10])) + (" ..." if len(r["failing"]) > 10 else "")
            parts.append(f"  rule '{r['rule']}' failed for {len(r['failing'])} item(s): {shown}")
    return "\n".join(parts)


class Checked(NamedTuple):
    """What the task's tables and rules found (no tables and one failed rule when the dataset cannot be read)."""

    tables: dict[str, pd.DataFrame]
    results: list[dict]
    notes: list[str]
    n_samples: int
    summaries: dict[str, str]


def check_data(st) -> Checked:
    """The task's tables, its rules and the symlink policy run on them, its notes and summaries."""
    try:
        tables = st.task.validation_tables()
        checks = st.task.checks(tables)
        results = run_checks(checks, tables)
        notes = st.task.validation_notes(tables)
        link_results, link_notes = symlink_policy(tables, Path(st.cfg.data.path), st.cfg.data.follow_symlinks)
        results, notes = results + link_results, notes + link_notes
        n_samples = len(next(iter(tables.values())))
        return Checked(tables, results, notes, n_samples, st.task.validation_summaries(tables))
    except DataError as err:
        unreadable = {
            "table": "-",
            "rule": "dataset readable",
            "expectation": "-",
            "success": False,
            "unexpected_count": 1,
            "failing": [str(err)],
        }
        return Checked({}, [unreadable], [], 0, {})


def build_report(task_name: str, checked: Checked) -> dict:
    return {
        "task": task_name,
        "success": all(r["success"] for r in checked.results),
        "n_samples": checked.n_samples,
        "checks": checked.results,
        "notes": checked.notes,
        "summaries": checked.summaries,
        "data_version": digest_tables(checked.tables),  # per split and overall (tasks/track/data_version.py)
    }


def write_report(out_dir: Path, report: dict, tables: dict[str, pd.DataFrame]) -> None:
    """report.json, report.md and each table as CSV; all or nothing."""
    with atomic_dir(out_dir) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(_markdown(report["task"], report))
        for name, df in tables.items():
            df.to_csv(tmp / f"{name}.csv", index=False)


def log_report(st, out_dir: Path, report: dict) -> None:
    """MLflow: the report, the data read, the counts and the tags validation and data_version (what was just read)."""
    st.log_artifacts(out_dir, "validation")
    st.log_inputs(*[s for s in report["data_version"] if s in ("train", "val", "test")])
    st.log_metrics(
        {
            "validation.n_samples": report["n_samples"],
            "validation.failed_rules": sum(not r["success"] for r in report["checks"]),
            "validation.notes": len(report["notes"]),
        }
    )
    import mlflow

    mlflow.set_tag("validation", "passed" if report["success"] else "failed")
    mlflow.set_tag("data_version", report["data_version"]["all"]["digest"])


def run(
    task_name: str,
    params_path: str | Path = "params.yaml",
    overrides: dict[str, Any] | None = None,
    pipeline_run_id: str | None = None,
) -> dict:
    with open_stage("validate", task_name, params_path, overrides, pipeline_run_id) as st:
        out_dir = outputs(task_name, "validate")
        checked = check_data(st)
        report = build_report(task_name, checked)
        write_report(out_dir, report, checked.tables)
        log_report(st, out_dir, report)
        print(
            f"[validate] {task_name}: {'passed' if report['success'] else 'FAILED'} "
            f"({checked.n_samples} samples, {len(checked.notes)} notes) -> {out_dir / 'report.md'}"
        )
        if not report["success"]:
            raise ValidationFailed(
                f"data validation failed for task '{task_name}' (report: {out_dir / 'report.md'}):\n"
                + failure_summary(report)
            )
        return report
