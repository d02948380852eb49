"""One command line for every stage, called by dvc.yaml:

    python -m tasks generate
    python -m tasks pretrain
    python -m tasks crops          (object crops of a detection task, to pretrain on)
    python -m tasks {validate,normstats,baseline,augmented,evaluate} --task classification
    python -m tasks report

Known failures (bad data, bad params, a failed sanity check) print a clear message and exit 1.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from tasks.chain import PER_TASK as STAGES  # noqa: E402  (the stage chain, defined once)


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("generate", "pretrain", "crops", *STAGES, "report"))
    parser.add_argument("--task", help="CV task name (a key of tasks: in params.yaml)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params value, e.g. --set tasks.classification.train.epochs=1")
    args = parser.parse_args(argv)

    from cv_models.base import DataError
    from cv_models.weights import WeightsError
    from tasks.config import ConfigError
    from tasks.engine import OverfitCheckFailed
    from tasks.validate import ValidationFailed

    overrides = parse_overrides(args.overrides)
    try:
        if args.stage in ("generate", "pretrain", "crops"):
            importlib.import_module(f"tasks.{args.stage}").run(args.params, overrides)
        elif args.stage == "report":
            importlib.import_module("tasks.report").main(args.params)
        else:
            if not args.task:
                parser.error(f"stage {args.stage} needs --task")
            importlib.import_module(f"tasks.{args.stage}").run(args.task, args.params, overrides)
    except (ValidationFailed, DataError, ConfigError, OverfitCheckFailed, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
