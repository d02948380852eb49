"""The classification pipeline end to end on tiny synthetic data: `dvc repro` in a fresh git repo,
the Prefect flow on the same params (same metrics), MLflow records, and bad data stopping the run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides, write_params

pytestmark = pytest.mark.e2e
CODE = ("flows", "tasks", "cv_models", "dvc.yaml", ".dvcignore")
# two well-separated classes and small batches: the tiny model learns them in seconds
EPOCHS = 8
E2E = {
    "shapes.classes": ["circle", "star"],
    "tasks.classification.train.epochs": EPOCHS,
    "tasks.classification.train.batch_size": 8,
    "pretrain.epochs": 1,
}


def make_repo(folder: Path, keep_tasks: list[str] | None = None, **overrides) -> Path:
    """A git + DVC repository holding the pipeline's code and tiny params (only ``keep_tasks``, if given)."""
    folder.mkdir(parents=True)
    for name in CODE:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, folder / name)
    path = write_params(folder, tiny_overrides(**{**E2E, **overrides}))
    if keep_tasks is not None:
        import yaml

        raw = yaml.safe_load(path.read_text())
        raw["tasks"] = {k: v for k, v in raw["tasks"].items() if k in keep_tasks}
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline"],
    ):
        subprocess.run(cmd, cwd=folder, check=True, env=_env())
    return folder


def _env(**extra) -> dict:
    env = dict(os.environ, **extra)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


def dvc(folder: Path, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=folder, capture_output=True, text=True, env=_env(**env), timeout=900)


def evaluation(folder: Path) -> dict:
    return json.loads((folder / "outputs/classification/evaluate/metrics.json").read_text())


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("e2e") / "repo", keep_tasks=["classification"])
    result = dvc(repo, "repro", CV_PIPELINE_RUN_ID="e2e-dvc")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return repo


def test_dvc_repro_beats_the_dummy(dvc_repo):
    m = evaluation(dvc_repo)
    assert m["n_test"] == 72
    assert m["baseline"]["accuracy"] > m["dummy"]["accuracy"] + 0.15
    assert m["augmented"]["accuracy"] > m["dummy"]["accuracy"] + 0.15
    for out in (
        "models/classification/baseline/model.pt",
        "models/classification/augmented/model.pt",
        "outputs/classification/augmented/augment_preview.png",
        "outputs/classification/evaluate/details/confusion_matrix_augmented.png",
        "outputs/classification/validate/report.md",
        "outputs/classification/normstats/mean_image.png",
        "models/pretrain/backbone.pt",
    ):
        assert (dvc_repo / out).exists(), out
    # the compared models' one change, stated: exactly the augmentations params.yaml switches on
    comparison = (dvc_repo / "outputs/classification/evaluate/comparison.md").read_text()
    assert "## What differs between baseline and augmented" in comparison
    assert set(m["settings_changed"]) == {
        "augment.hflip.enabled",
        "augment.vflip.enabled",
        "augment.rotation.enabled",
        "augment.color.enabled",
    }
    assert "| `augment.hflip.enabled` | False | True |" in comparison
    status = dvc(dvc_repo, "status")
    assert "up to date" in status.stdout, status.stdout
    shown = dvc(dvc_repo, "metrics", "show", "--json")
    assert "accuracy" in shown.stdout


def test_dvc_repro_ends_with_the_champion_registered_and_named_in_the_report(dvc_repo):
    import mlflow

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    registered = json.loads((dvc_repo / "outputs/classification/evaluate/registry.json").read_text())
    version = client.get_model_version("cv-classification", str(registered["version"]))
    assert version.tags["cv_task"] == "classification" and version.tags["stage"] == registered["stage"]
    assert float(version.tags["test.accuracy"]) == pytest.approx(
        evaluation(dvc_repo)[registered["stage"]]["accuracy"], abs=1e-6
    )
    champion = client.get_model_version_by_alias("cv-classification", "champion")
    assert int(champion.version) == registered["champion_version"]  # this run's or a better one on the same data
    report = subprocess.run(
        [sys.executable, "-m", "tasks", "report"], cwd=dvc_repo, capture_output=True, text=True, env=_env()
    )
    assert f"cv-classification v{registered['version']}" in report.stdout, report.stdout + report.stderr


def test_mlflow_holds_the_stage_runs_with_seeds_and_metrics(dvc_repo):
    import mlflow

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("cv-classification")
    runs = client.search_runs([exp.experiment_id], "tags.pipeline_run_id = 'e2e-dvc'")
    stages = {r.data.tags.get("stage"): r for r in runs if r.data.tags.get("kind") == "stage"}
    assert set(stages) == {"validate", "normstats", "baseline", "augmented", "evaluate"}
    parent = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert len(parent) == 1
    for run in stages.values():
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert run.data.params["seed"] == "42" and run.data.params["seed.torch"] == "42"
        assert len(run.data.tags["git_commit"]) >= 40
    assert stages["baseline"].data.tags["data_version"] not in ("", "unknown")
    evaluate_run = stages["evaluate"]
    assert evaluate_run.data.metrics["test.augmented.accuracy"] == pytest.approx(
        evaluation(dvc_repo)["augmented"]["accuracy"]
    )
    history = client.get_metric_history(stages["baseline"].info.run_id, "val_accuracy")
    assert len(history) == EPOCHS
    # the pipeline row, filled although every stage ran in its own process: settings, test metrics,
    # and a span from the first stage's start to the last stage's end
    row = client.get_run(parent[0].info.run_id)
    assert row.data.params["train.epochs"] == str(EPOCHS) and row.data.params["seed"] == "42"
    assert row.data.metrics["test.augmented.accuracy"] == pytest.approx(evaluation(dvc_repo)["augmented"]["accuracy"])
    assert row.data.metrics["train_seconds"] > 0
    assert row.info.status == "FINISHED"
    assert row.info.start_time <= stages["validate"].info.start_time
    assert row.info.end_time >= stages["evaluate"].info.end_time
    assert {d.dataset.name for d in row.inputs.dataset_inputs} == {
        f"classification-{s}" for s in ("train", "val", "test")
    }


@pytest.fixture(scope="module")
def cli_rerun(dvc_repo, tmp_path_factory):
    """A copy of the repo with its results committed, then baseline, augmented and evaluate run again through
    ``python -m tasks`` (one epoch): each stage's output and `git status` right after it."""
    repo = tmp_path_factory.mktemp("cli") / "repo"
    shutil.copytree(dvc_repo, repo, symlinks=True)  # a copy: the other tests keep the fixture's results
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")  # the project's: checkpoints/, .locks/, caches
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True, env=_env())
    subprocess.run([*git, "commit", "-qm", "results"], cwd=repo, check=True, env=_env())
    runs = {}
    for stage in ("baseline", "augmented", "evaluate"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tasks",
                stage,
                "--task",
                "classification",
                "--set",
                "tasks.classification.train.epochs=1",
            ],
            cwd=repo,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        runs[stage] = (result.stdout + result.stderr, status)
    return repo, runs


def test_stages_run_through_the_cli_keep_every_tracked_file(cli_rerun):
    """A stage's output folder is swapped in whole; the files git tracks there (DVC's .gitignore) must survive,
    so `git status` shows at most the stage's rewritten metrics, never a deleted or an untracked file."""
    repo, runs = cli_rerun
    tracked = set(
        subprocess.run(["git", "ls-files", "outputs"], cwd=repo, capture_output=True, text=True).stdout.split()
    )
    assert "outputs/classification/baseline/.gitignore" in tracked
    for stage, (_, status) in runs.items():
        changed = [line for line in status if not line.startswith(" M ")]  # rewritten metrics: a stage's result
        assert changed == [], f"after {stage}: {changed}"
        assert all(line[3:] in tracked for line in status), status


def test_stages_print_no_library_warnings_and_one_registry_line(cli_rerun):
    """The causes fixed, not the warnings filtered: a writable array for torch, a typed `predict`, a declared
    output schema and a model logged from code (no pickle); the registration in one line of the pipeline's own."""
    _, runs = cli_rerun
    for stage, (out, _) in runs.items():
        assert "is not writable" not in out, f"{stage}: {out[-3000:]}"
    out = runs["evaluate"][0]
    for noise in (
        "Add type hints",
        "Inferred schema contains integer column",
        "CloudPickle",
        "already exists",
        "Created version",
    ):
        assert noise not in out, f"{noise!r} in the evaluate stage's output:\n{out[-3000:]}"
    registry = [line for line in out.splitlines() if "registered version" in line]
    assert len(registry) == 1 and re.match(r"\[registry\] cv-classification: registered version \d+ \(", registry[0]), (
        registry
    )


@pytest.mark.slow  # make test-all (suite budget): the flow calls the same stage functions in CHAIN's order
# (tests/test_chain.py), and test_e2e_detection.py trains through a served flow on a real Prefect server
def test_prefect_flow_gives_the_same_metrics(dvc_repo, tmp_path, monkeypatch):
    from tests.conftest import prefect_harness

    from flows.pipeline import FLOWS

    repo = make_repo(tmp_path / "flow", keep_tasks=["classification"])
    monkeypatch.chdir(repo)
    with prefect_harness():
        result = FLOWS["classification"](params_path="params.yaml")
    assert result["augmented"]["accuracy"] == evaluation(dvc_repo)["augmented"]["accuracy"]
    assert quality(evaluation(repo)) == quality(evaluation(dvc_repo))


def quality(metrics: dict) -> dict:
    """The metrics without the inference-speed figures (those are timings, never equal twice)."""
    timing = {"images_per_second", "latency_ms"}
    return {
        model: {k: v for k, v in m.items() if k not in timing} if isinstance(m, dict) else m
        for model, m in metrics.items()
        if model != "overfitting"
    }


@pytest.mark.slow  # make test-all (suite budget): tests/test_bad_input.py covers each format's rules through the CLI
def test_corrupted_sample_stops_dvc_repro_naming_the_file(dvc_repo, tmp_path_factory):
    repo = make_repo(
        tmp_path_factory.mktemp("bad") / "repo",
        keep_tasks=["classification"],
        **{"tasks.classification.data.path": "userdata"},
    )
    shutil.copytree(dvc_repo / "data/shapes/classification", repo / "userdata")
    victim = sorted((repo / "userdata/train/star").glob("*.png"))[3]
    victim.write_bytes(victim.read_bytes()[:64])
    result = dvc(repo, "repro")
    assert result.returncode != 0
    assert f"userdata/train/star/{victim.name}" in result.stderr
    assert "every file decodes as an image" in result.stderr
    assert not (repo / "models/classification/baseline").exists()  # stopped before training
    report = json.loads((repo / "outputs/classification/validate/report.json").read_text())
    assert not report["success"]
