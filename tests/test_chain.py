"""The stage chain is defined once (tasks/chain.py): dvc.yaml, the Prefect flow and the CLI follow it,
and dvc.yaml's dependencies are per task."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.chain import BY_HAND, CHAIN, ONCE, PER_TASK, SHARED, TRAINED, stages_for
from tasks.config import load_params
from tests.conftest import REPO, write_params


def test_dvc_yaml_has_the_chain_in_order():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert tuple(stages) == CHAIN
    for name in PER_TASK:
        assert stages[name]["foreach"] == "${tasks}"
        assert stages[name]["do"]["cmd"] == f"python -m tasks {name} --task ${{key}}"
    for name in SHARED:
        assert stages[name]["cmd"] == f"python -m tasks {name}"


def test_dvc_yaml_trains_the_chains_models():
    """The trained models are the chain's TRAINED stages: each saves models/<task>/<stage>, evaluate reads them all."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    saving = {
        name
        for name in PER_TASK
        for out in stages[name]["do"].get("outs", [])
        if str(next(iter(out)) if isinstance(out, dict) else out).startswith("models/")
    }
    assert saving == set(TRAINED)
    for name in TRAINED:
        assert f"models/${{key}}/{name}" in stages[name]["do"]["outs"]
    assert [d.split("/")[-1] for d in stages["evaluate"]["do"]["deps"] if d.startswith("models/")] == list(TRAINED)
    assert not set(BY_HAND) & set(stages)


def test_the_trained_models_are_declared_once():
    """No module but tasks/chain.py lists the trained models again (they come from chain.TRAINED)."""
    pair = re.compile(r"""["']baseline["'],\s*["']augmented["']|["']augmented["'],\s*["']baseline["']""")
    hits = [
        f"{path.relative_to(REPO)}:{n}"
        for folder in ("tasks", "flows")
        for path in sorted((REPO / folder).rglob("*.py"))
        if path != REPO / "tasks" / "chain.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pair.search(line)
    ]
    assert hits == []


def test_cli_runs_the_chains_stages(monkeypatch):
    """``python -m tasks <stage>`` offers the chain's stages (and the by-hand ones) and runs them as the chain says."""
    import tasks.cli

    calls = []
    monkeypatch.setattr(tasks.cli, "stage_function", lambda name: lambda *args: calls.append((name, args)))
    for name in (*ONCE, *PER_TASK):
        assert tasks.cli.main([name, "--task", "classification", "--params", "p.yaml"]) == 0
    assert calls == [(n, ("p.yaml", {})) for n in ONCE] + [(n, ("classification", "p.yaml", {})) for n in PER_TASK]
    with pytest.raises(SystemExit):  # not a stage
        tasks.cli.main(["crop", "--params", "p.yaml"])


def test_flow_runs_pretrain_only_for_a_task_that_uses_it(tmp_path):
    plain = load_params(write_params(tmp_path, {}))
    assert stages_for(plain, "detection") == ["generate", *PER_TASK]
    uses = load_params(
        write_params(
            tmp_path,
            {
                "tasks.detection.model.options.backbone": "resnet18",
                "tasks.detection.model.options.backbone_weights": "models/pretrain/backbone.pt",
            },
        )
    )
    assert stages_for(uses, "detection") == ["generate", "pretrain", *PER_TASK]
    assert stages_for(uses, "classification") == ["generate", *PER_TASK]


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"], DVC_NO_ANALYTICS="1"
    )
    result = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def _outdated(repo: Path) -> set[str]:
    return set(json.loads(_dvc(repo, "status", "--json").stdout or "{}"))


@pytest.mark.e2e
def test_dvc_dependencies_are_per_task(tmp_path):
    """Record every stage as done without training (placeholder outputs committed with `dvc commit -f`), then
    change one thing and ask `dvc status` what it would re-run. Two tasks: every task's stages come from the same
    `foreach` template, and instance segmentation is the one whose code is closest to detection's (each dvc
    command here hashes every stage's dependencies: twice the tasks, twice the time)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "tasks", "cv_models"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, repo / name)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tasks"] = {k: raw["tasks"][k] for k in ("detection", "instance_segmentation")}
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _dvc(repo, "init", "--no-scm", "-q")
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:  # every output a stage declares, as a placeholder
        paths = [Path(out.fs_path) for stage in dvc_repo.index.stages for out in stage.outs]
    for path in paths:
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("placeholder\n")
        else:
            for sub in ("classification", "scenes", "."):  # data/shapes holds the tasks' data folders
                (path / sub).mkdir(parents=True, exist_ok=True)
                (path / sub / "placeholder.txt").write_text("placeholder\n")
    _dvc(repo, "commit", "-f", "-q")
    assert _outdated(repo) == set()

    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["tasks"]["detection"]["augment"]["hflip"]["p"] = 0.9
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert _outdated(repo) == {"augmented@detection", "evaluate@detection"}
    _dvc(repo, "commit", "-f", "-q")

    with open(repo / "cv_models/detection/__init__.py", "a") as f:  # the detection module: detection's stages only
        f.write("\n# edited\n")
    assert _outdated(repo) == {f"{s}@detection" for s in PER_TASK}


@pytest.mark.e2e
def test_prefect_flow_runs_the_chain_with_pretrain_when_used(tmp_path, monkeypatch):
    """The real flow and its Prefect tasks, with each stage's function replaced by a recorder (no training)."""
    from tests.conftest import prefect_harness

    import tasks.chain
    from flows.pipeline import FLOWS

    calls = []

    def recorder(name):
        def run(*args, **kwargs):
            calls.append(name)
            return {"stage": name}

        return run

    monkeypatch.setattr(tasks.chain, "stage_function", recorder)
    monkeypatch.chdir(tmp_path)
    params = str(
        write_params(
            tmp_path,
            {
                "tasks.detection.model.options.backbone": "resnet18",
                "tasks.detection.model.options.backbone_weights": "models/pretrain/backbone.pt",
            },
        )
    )
    with prefect_harness():
        result = FLOWS["detection"](params_path=params)
        assert calls == list(CHAIN) and result == {"stage": "evaluate"}
        calls.clear()
        FLOWS["classification"](params_path=params)
        assert calls == ["generate", *PER_TASK]
