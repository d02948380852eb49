"""Writing the settings ``init`` proposes: the task's block of a params file, the rest of the file untouched
(comments included), or a new params file holding that task alone. The text is checked with
:func:`tasks.config.load_params` before it replaces anything, so a failed write leaves the old file as it was."""

from __future__ import annotations

import copy
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tasks.config import ConfigError, _set_dotted, load_params, load_raw


def merged_block(base: dict, data: dict, choices: list) -> dict:
    """The task's section: ``base`` with the reading's data block in place of its own and every choice set."""
    block = copy.deepcopy(base)
    block["data"] = copy.deepcopy(data)
    for choice in choices:
        _set_dotted(block, choice.key, choice.value)
    return block


def _dump(task: str, block: dict, header: str) -> str:
    text = yaml.safe_dump({task: block}, sort_keys=False, default_flow_style=None, width=120, allow_unicode=True)
    return f"  # {header}\n" + "".join(f"  {line}\n" for line in text.splitlines())


HEADER = "written by python -m tasks init"


def _block_span(lines: list[str], task: str) -> tuple[int, int]:
    """(first, end) line numbers of ``  <task>:`` under ``tasks:`` (an empty span at the section's end when the
    task has no block); the comment init wrote above the block belongs to it, comments above the next do not."""
    top = next((i for i, line in enumerate(lines) if re.match(r"^tasks:\s*(#.*)?$", line)), None)
    if top is None:
        raise ConfigError("the params file has no top-level 'tasks:' section to write into")
    section_end = next(
        (i for i in range(top + 1, len(lines)) if lines[i].strip() and lines[i][0] not in " #"), len(lines)
    )
    start = next(
        (i for i in range(top + 1, section_end) if re.match(rf"^  {re.escape(task)}:\s*(#.*)?$", lines[i])), None
    )
    if start is None:
        return section_end, section_end
    end = next((i for i in range(start + 1, section_end) if re.match(r"^  [^\s#]", lines[i])), section_end)
    while end > start + 1 and (not lines[end - 1].strip() or re.match(r"^ {0,2}#", lines[end - 1])):
        end -= 1
    if start > 0 and lines[start - 1].strip().startswith(f"# {HEADER}"):
        start -= 1
    return start, end


def replace_block(text: str, task: str, block: dict, header: str) -> str:
    lines = text.splitlines(keepends=True)
    start, end = _block_span(lines, task)
    return "".join(lines[:start]) + _dump(task, block, header) + "".join(lines[end:])


def _atomic_write(out: Path, text: str) -> None:
    """Write beside ``out``, check it as a params file, then move it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        load_params(tmp)  # every section checked: a bad value stops here, the old file stays
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_settings(out: Path, base: Path, task: str, block: dict, header: str) -> None:
    """Into ``out``'s task block when ``out`` is a params file with a tasks section; else a new params file:
    ``base`` with ``tasks:`` holding this task alone."""
    out = Path(out)
    if out.exists():
        text = replace_block(out.read_text(), task, block, header)
    else:
        raw: dict[str, Any] = load_raw(base)
        raw["tasks"] = {task: block}
        text = f"# {header}\n" + yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=120)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out, text)
