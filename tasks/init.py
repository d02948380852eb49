"""Your data in one command:

    python -m tasks init PATH [--task T] [--format F] [--budget-minutes M] [--kind photos|street|microscopy|documents]
                              [--out FILE] [--params BASE] [--no-validate]

1. finds the layout of PATH among every format the readers support (cv_models/data/layout.py): the task,
   the format, the splits (or a seeded split), ignore values and the class names the data carries;
   when two layouts fit it lists them and asks for --task / --format; when none fits it names the closest;
2. measures the data (cv_models/data/measure.py) with the task's own reader;
3. proposes settings for the time budget (tasks/init_rules.py) and prints them with the reason for each;
4. writes them as the task's block of --out (default params.yaml, the file `dvc repro` and the flows read;
   the rest of the file is kept) or, when --out does not exist, a new params file holding that task alone;
5. runs the validate stage on the written settings, so bad data is reported before any training.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cv_models import TASKS, get_task
from cv_models.data.layout import AmbiguousLayout, find_layout
from cv_models.data.layout_facts import Reading
from cv_models.data.measure import DataFacts, measure
from cv_models.settings import validate_task
from tasks.config import load_raw
from tasks.init_rules import KINDS, Choice, propose
from tasks.init_write import HEADER, merged_block, write_settings

REPO = Path(__file__).resolve().parents[1]


@dataclass
class InitResult:
    reading: Reading
    classes: list[str]
    facts: DataFacts
    choices: list[Choice]
    out: Path
    seconds: float  # finding, measuring, proposing and writing (validation excluded)
    report: dict | None = None  # the validate stage's report


def _base_block(base: Path, task: str) -> dict:
    """The task's section of the base params file, or of the repository's params.yaml when it has none."""
    raw = load_raw(base) if base.exists() else {}
    block = (raw.get("tasks") or {}).get(task)
    return block if block is not None else load_raw(REPO / "params.yaml")["tasks"][task]


def plan(
    path: Path,
    task: str | None = None,
    fmt: str | None = None,
    budget_minutes: float = 10.0,
    kind: str | None = None,
    base: Path = Path("params.yaml"),
) -> tuple[Reading, list[str], DataFacts, list[Choice], dict]:
    """The reading, class names, facts, choices and the task's new section, without writing anything."""
    reading = find_layout(Path(path), task, fmt)
    base_block = _base_block(Path(base), reading.task)
    cfg = validate_task(TASKS[reading.task].settings, {**base_block, "data": reading.data}, reading.task)
    cv_task = get_task(reading.task, cfg)
    classes = cv_task.class_names()
    facts = measure(cv_task.validation_tables(), classes)
    choices = propose(reading.task, facts, budget_minutes, kind, cfg.model_dump())
    return reading, classes, facts, choices, merged_block(base_block, reading.data, choices)


def run(
    path: str | Path,
    task: str | None = None,
    fmt: str | None = None,
    budget_minutes: float = 10.0,
    kind: str | None = None,
    out: str | Path = "params.yaml",
    base: str | Path | None = None,
    validate: bool = True,
    echo=print,
) -> InitResult:
    t0 = time.perf_counter()
    out = Path(out)
    base = Path(base) if base else next(p for p in (out, Path("params.yaml"), REPO / "params.yaml") if p.exists())
    reading, classes, facts, choices, block = plan(Path(path), task, fmt, budget_minutes, kind, base)
    header = f"{HEADER} {path} --budget-minutes {budget_minutes:g}: see the table it printed for why"
    write_settings(out, base, reading.task, block, header)
    result = InitResult(reading, classes, facts, choices, out, time.perf_counter() - t0)
    echo(render(result))
    if validate:
        from tasks import validate as validate_stage

        result.report = validate_stage.run(reading.task, str(out))
        echo(
            f"\nvalidate: {sum(c['success'] for c in result.report['checks'])} of {len(result.report['checks'])} "
            f"rules pass, {len(result.report['notes'])} notes (outputs/{reading.task}/validate/)"
        )
    echo(next_command(reading.task, out))
    return result


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [min(60, max(len(str(r[k])) for r in [header, *rows])) for k in range(len(header) - 1)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)) + "  " + header[-1]]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) + "  " + str(r[-1]) for r in rows]
    return "\n".join(lines)


def render(r: InitResult) -> str:
    rd = r.reading
    head = [
        f"layout: {rd.task} / format {rd.format} at {rd.data['path']}",
        f"  {rd.evidence}",
        (
            f"  split: {rd.data['split_from']}{' (seeded 70/15/15)' if rd.data['split_from'] == 'seed' else ''}; "
            f"classes ({len(r.classes)}): {', '.join(r.classes[:10])}{' ...' if len(r.classes) > 10 else ''}"
        ),
    ]
    ignore = rd.data.get("options", {}).get("ignore_values")
    if ignore:
        head.append(f"  ignore values: {ignore} (read as the loss's ignore index)")
    if rd.also:
        head.append(f"  the same annotations also serve: {', '.join(rd.also)} (--task)")
    facts = _table(r.facts.rows(), ("figure", "value"))
    rows, last = [], None
    for c in r.choices:  # a reason shared with the row above is not repeated
        rows.append((c.key, _short(c.value), '"' if c.why == last else c.why))
        last = c.why
    settings = _table(rows, (f"setting (tasks.{rd.task}.)", "value", "why"))
    return "\n".join([*head, "", facts, "", settings, "", f"written to {r.out} in {r.seconds:.1f} s"])


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def next_command(task: str, out: Path) -> str:
    if out.name == "params.yaml":
        return (
            f"\nnext: dvc repro evaluate@{task}   (or: python -m flows.pipeline {task}); edit {out} to change a setting"
        )
    return (
        f"\nnext: python -m tasks baseline --task {task} --params {out}   (each stage takes --params; the flows "
        f"take params_path={out}); edit {out} to change a setting"
    )


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tasks init", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("path", help="the dataset folder")
    ap.add_argument("--task", choices=sorted(TASKS), help="the task, when the folder serves several")
    ap.add_argument(
        "--format", dest="fmt", help="the format (imagefolder, mask_folder, coco, voc, yolo, instance_folders)"
    )
    ap.add_argument("--budget-minutes", type=float, default=10.0, help="training wall time (default 10)")
    ap.add_argument("--kind", choices=KINDS, help="the kind of images: picks the augmentation preset")
    ap.add_argument(
        "--out",
        default="params.yaml",
        help="params file to write the task's block into (default params.yaml); a new file holds that task alone",
    )
    ap.add_argument("--params", help="the params file whose other settings are kept (default: --out, else params.yaml)")
    ap.add_argument("--no-validate", action="store_true", help="skip the validate stage")
    args = ap.parse_args(argv)
    from cv_models.base import DataError
    from tasks.config import ConfigError
    from tasks.validate import ValidationFailed

    try:
        run(args.path, args.task, args.fmt, args.budget_minutes, args.kind, args.out, args.params, not args.no_validate)
    except AmbiguousLayout as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (DataError, ConfigError, ValidationFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
