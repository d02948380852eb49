"""No import circle in the project (imports inside functions counted), and dvc.yaml's code dependencies
cover every module a stage runs, as the import graph says (tests/import_graph.py reads it with ``ast``)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

from tests import import_graph as ig
from tests.import_graph import REPO, cycles, import_graph, reachable

# Modules a stage imports that do not change what it writes, so editing them re-runs nothing. Each with its reason.
NOT_OUTPUT = {
    "cv_models/__init__.py": "imports the task modules so that they register; a stage's own task module is a dep",
    "tasks/runners/experiment_settings.py": "the schemas of ablation: and search:, which no pipeline stage reads",
    "tasks/paths.py": "where outputs go, and writing them atomically",
    "tasks/stage.py": "stage bookkeeping: lock, MLflow run, clean-up of dead runs",
    "tasks/training/runstate.py": "run state and clean-up of dead processes' runs and folders",
    "tasks/track/tracking.py": "MLflow logging",
    "tasks/track/mlflow_view.py": "the MLflow UI's saved view",
}


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_a_circle_through_an_import_inside_a_function_is_found(tmp_path):
    """The check itself: a circle closed only by a function-level ``from x import y`` is still a circle."""
    package = tmp_path / "tasks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from tasks import b\n")
    (package / "b.py").write_text("def f():\n    from tasks.a import thing\n    return thing\n")
    (package / "c.py").write_text("from . import a\n")
    (package / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tasks import c\n")
    graph = import_graph(tmp_path)
    assert graph["tasks.b"] == {"tasks.a"} and graph["tasks.c"] == {"tasks.a"} and graph["tasks.d"] == set()
    assert cycles(graph) == [["tasks.a", "tasks.b"]]


@cache
def _project_graph() -> dict[str, set[str]]:
    return import_graph()


def _covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


def stage_code(stage_module: str, deps: list[str], task_modules: set[str]) -> set[str]:
    """The project files a stage runs: its module and the task modules its deps name, and everything they import,
    never entering a task module the stage does not name (the package's ``__init__`` imports them all to register them)."""
    graph, files = _project_graph(), ig.module_files()
    named = {m for m in task_modules if _covered(files[m].relative_to(REPO), deps)}
    code: set[str] = set()
    for start in [stage_module, *named]:
        code |= reachable(graph, start, stop=task_modules - named)
    return {str(files[m].relative_to(REPO)) for m in code}


def dvc_stages() -> list[tuple[str, str, list[str]]]:
    """(stage name, stage module, code deps) of every stage of dvc.yaml, per task for ``foreach`` stages."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    tasks = list(yaml.safe_load((REPO / "params.yaml").read_text())["tasks"])
    out = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        module = "tasks." + body["cmd"].split()[3]  # python -m tasks <stage> ...
        for key in tasks if "foreach" in stage else [None]:
            deps = [d.replace("${key}", key) if key else d for d in body["deps"]]
            out.append((f"{name}@{key}" if key else name, module, [d for d in deps if "$" not in d]))
    return out


def test_dvc_code_deps_cover_the_import_graph():
    task_modules = {f"cv_models.{t}" for t in yaml.safe_load((REPO / "params.yaml").read_text())["tasks"]}
    missing = {}
    for name, module, deps in dvc_stages():
        for dep in deps:
            if dep.startswith(("tasks/", "cv_models/")):
                assert (REPO / dep).exists(), f"dvc.yaml, stage {name}: dependency {dep} does not exist"
        lacking = sorted(
            f for f in stage_code(module, deps, task_modules) if f not in NOT_OUTPUT and not _covered(Path(f), deps)
        )
        if lacking:
            missing[name] = lacking
    assert missing == {}, f"dvc.yaml's deps miss modules these stages import: {missing}"
