"""One command line for every stage, called by dvc.yaml:

    python -m tasks generate
    python -m tasks pretrain
    python -m tasks crops          (object crops of a detection task, to pretrain on)
    python -m tasks {validate,normstats,baseline,augmented,evaluate} --task classification
    python -m tasks report
    python -m tasks repro [--jobs N]   (dvc repro with N tasks' chains at once: tasks/repro.py; make run)
    python -m tasks init PATH [--task T] [--budget-minutes M] [--kind K] [--out FILE]   (your data: tasks/init.py)
    python -m tasks predict --task detection --model best --input photos/ --out predictions/
    python -m tasks export --task detection --model best --format onnx [--out exports/detection]

--model: baseline | augmented | best (by the validation metric) | path/to/model.pt or a bundle folder |
models:/cv-<task>@champion (the Model Registry of the project's tracking store).

Known failures (bad data, bad params, a failed sanity check) print a clear message and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from tasks.chain import ONCE, PER_TASK, TRAINED, stage_function  # the stage chain, defined once

# the failures a stage reports in one line (exit 1), by module and class. Only a module that was imported can have
# raised one, so they are looked up there when caught (known_errors): a stage that needs no model, such as
# generate, never imports torch just to name these
KNOWN_ERRORS = (
    ("tasks.validate", "ValidationFailed"),
    ("cv_models.base", "DataError"),
    ("tasks.config", "ConfigError"),
    ("tasks.training.engine", "OverfitCheckFailed"),
    ("cv_models.weights", "WeightsError"),
    ("tasks.training.engine", "CheckpointError"),
    ("tasks.training.runstate", "StageBusy"),
)


def known_errors() -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[module], name) for module, name in KNOWN_ERRORS if module in sys.modules)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tasks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=(*ONCE, *PER_TASK, "report", "predict", "export"))
    parser.add_argument("--task", help="CV task name (a key of tasks: in params.yaml)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params value, e.g. --set tasks.classification.train.epochs=1",
    )
    parser.add_argument("--model", default="best", help="predict / export: which model (see above)")
    parser.add_argument("--input", help="predict: an image folder, an image file or a glob pattern")
    parser.add_argument("--out", help="predict: output folder; export: output folder (default exports/<task>)")
    parser.add_argument("--format", choices=("torchscript", "onnx"), default="onnx", help="export: file format")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="predict: exit 1 when any input is skipped (default: only when nothing could be predicted)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["init"]:  # python -m tasks init PATH ...: its own options (tasks/init.py)
        return importlib.import_module("tasks.init").main(argv[1:])
    if argv[:1] == ["repro"]:  # python -m tasks repro [--jobs N]: dvc repro, tasks side by side (tasks/repro.py)
        return importlib.import_module("tasks.repro").main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)

    from tasks.training.runstate import StageInterrupted

    overrides = parse_overrides(args.overrides)
    torchrun = start_torchrun(parser, args.stage)
    if args.stage in ("predict", "export"):
        return use_model(parser, args, overrides)
    try:
        run_stage(parser, args, overrides)
    except StageInterrupted as err:  # SIGTERM / SIGINT: the MLflow run ended KILLED, temporary outputs were removed
        print(
            f"error: {args.stage} {err}: its MLflow run is marked KILLED and its temporary outputs were removed; "
            f"run it again to resume from the last finished epoch",
            file=sys.stderr,
        )
        return 128 + err.signum
    except Exception as err:
        if not isinstance(err, known_errors()):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    if torchrun:
        from tasks.training import accelerate

        accelerate.shutdown()
    return 0


def start_torchrun(parser: argparse.ArgumentParser, stage: str) -> bool:
    """Under torchrun (WORLD_SIZE > 1; tasks.training.accelerate.launched_by_torchrun, without torch) only a training
    stage runs, in the process group started here."""
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torchrun and stage not in TRAINED:
        parser.error(f"under torchrun only the training stages run ({', '.join(TRAINED)}); run the others with python")
    if torchrun:
        from tasks.training import accelerate

        accelerate.init_from_env()
    return torchrun


def run_stage(parser: argparse.ArgumentParser, args: argparse.Namespace, overrides: dict) -> None:
    """One stage of the chain: once for all tasks, the report, or per task (``--task``)."""
    if args.stage in ONCE:
        stage_function(args.stage)(args.params, overrides)
    elif args.stage == "report":
        importlib.import_module("tasks.report").main(args.params)
    else:
        if not args.task:
            parser.error(f"stage {args.stage} needs --task")
        stage_function(args.stage)(args.task, args.params, overrides)


def use_model(parser: argparse.ArgumentParser, args, overrides: dict) -> int:
    """predict and export: known failures (bad input, wrong model, failed parity) exit 1 with the reason."""
    from tasks.use.inference import ModelError

    if not args.task:
        parser.error(f"{args.stage} needs --task")
    try:
        if args.stage == "predict":
            from tasks.use.predict import InputError, PredictionFailures

            if not args.input or not args.out:
                parser.error("predict needs --input and --out")
            try:
                importlib.import_module("tasks.use.predict").run(
                    args.task, args.model, args.input, args.out, args.params, overrides, strict=args.strict
                )
            except (InputError, PredictionFailures) as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
        else:
            from tasks.use.export import ParityError

            try:
                importlib.import_module("tasks.use.export").run(
                    args.task, args.model, args.format, args.out, args.params, overrides
                )
            except ParityError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
    except ModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
