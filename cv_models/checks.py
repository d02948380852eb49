"""Builders for the great-expectations checks that the tasks declare in ``checks()``.

Each builder returns one :class:`~cv_models.base.Check`: a table, a rule in plain words, one expectation and the
column that names a failing row. ``when`` is a pandas row condition (``"decodes == True"``): rows that do not
meet it are not checked. great-expectations is imported when a check is built, so importing a task stays cheap.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from cv_models.base import Check


def _rows(when: str | None) -> dict[str, Any]:
    return {"row_condition": when, "condition_parser": "pandas"} if when else {}


def _share(mostly: float | None) -> dict[str, Any]:
    return {} if mostly is None else {"mostly": mostly}


def _expectations() -> Any:
    import great_expectations as gx

    return gx.expectations


def all_true(
    table: str, rule: str, column: str, when: str | None = None, key: str = "path", mostly: float | None = None
) -> Check:
    """Every (checked) row has ``column`` True."""
    return in_set(table, rule, column, [True], when=when, key=key, mostly=mostly)


def in_set(
    table: str,
    rule: str,
    column: str,
    values: Collection[Any],
    when: str | None = None,
    key: str = "path",
    mostly: float | None = None,
) -> Check:
    """Every (checked) row's ``column`` is one of ``values`` (or at least the share ``mostly`` of the rows: 0.0 lists
    the failing rows but passes)."""
    expectation = _expectations().ExpectColumnValuesToBeInSet(
        column=column, value_set=list(values), **_rows(when), **_share(mostly)
    )
    return Check(table, rule, expectation, key_column=key)


def within(
    table: str,
    rule: str,
    column: str,
    low: float | None,
    high: float | None,
    when: str | None = None,
    key: str = "path",
) -> Check:
    """Every (checked) row's ``column`` lies in [low, high] (an open side where None)."""
    expectation = _expectations().ExpectColumnValuesToBeBetween(
        column=column, min_value=low, max_value=high, **_rows(when)
    )
    return Check(table, rule, expectation, key_column=key)


def unique(table: str, rule: str, column: str, key: str = "path") -> Check:
    """No two rows share a value of ``column``."""
    return Check(table, rule, _expectations().ExpectColumnValuesToBeUnique(column=column), key_column=key)
