"""Ablation (one change at a time over seeds), Optuna search and Dask fan-out on tiny data.

Real Prefect flows (under prefect_test_harness), a real MLflow store, a real Optuna study and a real
Dask cluster; nothing is mocked. Two classes of the tiny shapes data keep every training to seconds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import write_params, tiny_overrides

TASK = "classification"
# two classes and three epochs: each arm+seed trains in a few seconds
SMALL = {
    "shapes.classes": ["circle", "star"],
    f"tasks.{TASK}.train.epochs": 2,
    f"tasks.{TASK}.train.batch_size": 8,
    f"tasks.{TASK}.train.eval_batch_size": 128,
    f"tasks.{TASK}.train.num_threads": 1,
}


@pytest.fixture(scope="module")
def harness():
    from tests.conftest import prefect_harness

    with prefect_harness():
        yield


@pytest.fixture
def small(tmp_path, monkeypatch, tiny_shapes):
    """A project with two of the tiny data's classes, its normalisation statistics ready."""
    for split in ("train", "val", "test"):
        for cls in SMALL["shapes.classes"]:
            shutil.copytree(
                tiny_shapes / "classification" / split / cls, tmp_path / "data/shapes/classification" / split / cls
            )
    monkeypatch.chdir(tmp_path)

    def params(**extra) -> str:
        return str(write_params(tmp_path, tiny_overrides(**{**SMALL, **extra})))

    from tasks import normstats

    normstats.run(TASK, params())
    return params


def mlflow_client():
    import mlflow

    return mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def children(parent_id: str) -> list:
    c = mlflow_client()
    exp = c.get_experiment_by_name("cv-" + TASK).experiment_id
    return c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)


# ---------------------------------------------------------------- interval arithmetic


def test_welch_interval_on_known_numbers():
    from scipy import stats

    from tasks.runners.ablation import table, welch_interval

    a, b = [0.80, 0.82, 0.84], [0.70, 0.71, 0.72]
    diff, low, high, df = welch_interval(a, b)
    # by hand: variances 4e-4 and 1e-4, se^2 = (4e-4 + 1e-4) / 3, Welch-Satterthwaite df = 50/17
    assert diff == pytest.approx(0.11)
    assert df == pytest.approx(50 / 17)
    half = stats.t.ppf(0.975, 50 / 17) * math.sqrt(5e-4 / 3)
    assert (low, high) == pytest.approx((0.11 - half, 0.11 + half))
    assert half == pytest.approx(0.0414, abs=1e-3)  # t(0.975, 2.94) = 3.21
    reference = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (low, high) == pytest.approx((reference.low, reference.high))

    rows = table({"baseline": b, "better": a, "same": [0.70, 0.72, 0.71], "one_seed": [0.9]}).set_index("change")
    assert rows.loc["better", "significant"] == "*" and rows.loc["same", "significant"] == ""
    assert rows.loc["same", "diff"] == pytest.approx(0.0)
    assert rows.loc["baseline", "std"] == pytest.approx(0.01)
    assert math.isnan(rows.loc["one_seed", "ci_low"]) and rows.loc["one_seed", "significant"] == ""


# ---------------------------------------------------------------- bad input: clear error, nothing trained


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"ablation.arms": ["hflip", "teleport"]}, r"unknown change\(s\) \['teleport'\]"),
        ({"ablation.seeds": 0}, r"ablation\.seeds: Input should be greater than or equal to 1"),
        ({"ablation.arms": ["pretrained"]}, r"arm 'pretrained' .* not a valid setting .*small_cnn"),
        (
            {"ablation.changes": {"typo": {"augment.hflp.enabled": True}}, "ablation.arms": ["typo"]},
            r"arm 'typo'.*hflp",
        ),
    ],
)
def test_bad_ablation_settings_stop_before_training(small, setting, message):
    from flows.ablation import ablate
    from tasks.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        ablate.fn(TASK, small(**setting))
    assert not Path("models").exists() and not Path(f"outputs/{TASK}/ablation").exists()


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            {"search.space": {"train.optimizer.lr": {"low": 0.1, "high": 0.001}}},
            r"search\.space\.train\.optimizer\.lr: Value error, low 0\.1 is above high 0\.001",
        ),
        (
            {"search.space": {"train.optimizer.learning_rate": {"low": 0.001, "high": 0.1}}},
            r"search\.space\.train\.optimizer\.learning_rate: .*not a valid setting",
        ),
        (
            {"search.space": {"train.batch_size": {"type": "categorical", "choices": [8, 0]}}},
            r"search\.space\.train\.batch_size: the value 0",
        ),
    ],
)
def test_bad_search_ranges_stop_before_training(small, setting, message):
    from flows.search import search
    from tasks.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        search.fn(TASK, small(**setting))
    assert not Path("models").exists() and not Path("optuna.db").exists()


# ---------------------------------------------------------------- the ablation end to end


@pytest.mark.e2e
def test_two_arm_two_seed_ablation_table_mlflow_and_resume(small, harness):
    from flows.ablation import ablate

    params = small(
        **{
            "ablation.arms": ["hflip", "mixup"],
            "ablation.seeds": 2,
            "ablation.runner": {"kind": "threads", "max_workers": 2},
        }
    )
    metrics = ablate(task_name=TASK, params_path=params)

    out = Path(f"outputs/{TASK}/ablation")
    table = json.loads((out / "metrics.json").read_text())
    assert table == metrics
    assert list(table["arms"]) == ["baseline", "hflip", "mixup"]
    assert all(row["seeds"] == 2 for row in table["arms"].values())
    for name in ("table.csv", "table.md", "ablation.png"):
        assert (out / name).stat().st_size > 0
    assert "| hflip | 2 |" in (out / "table.md").read_text()
    assert not list(Path("models").rglob("*.pt"))  # arm models are not kept by default

    # the MLflow parent holds one child per arm and seed; each row's mean is the mean of its children
    c = mlflow_client()
    exp = c.get_experiment_by_name("cv-" + TASK).experiment_id
    (parent,) = c.search_runs([exp], "tags.kind = 'ablation'")
    runs = children(parent.info.run_id)
    assert sorted((r.data.tags["arm"], r.data.tags["seed"]) for r in runs) == [
        (arm, seed) for arm in ("baseline", "hflip", "mixup") for seed in ("42", "43")
    ]
    for arm, row in table["arms"].items():
        values = [r.data.metrics["test_accuracy"] for r in runs if r.data.tags["arm"] == arm]
        assert all(r.info.status == "FINISHED" for r in runs)
        assert row["mean"] == pytest.approx(sum(values) / len(values))
        assert parent.data.metrics[f"mean.{arm}"] == pytest.approx(row["mean"])
        if arm != "baseline":
            base = [r.data.metrics["test_accuracy"] for r in runs if r.data.tags["arm"] == "baseline"]
            assert row["diff"] == pytest.approx(sum(values) / 2 - sum(base) / 2)
    assert len(c.get_metric_history(runs[0].info.run_id, "val_accuracy")) == 2  # per-epoch curves

    # stopped half way: two arm+seed results lost (files gone, MLflow run of one marked failed) -> only those retrain
    lost = [out / "runs/mixup/seed43/result.json", out / "runs/hflip/seed42/result.json"]
    mixup43 = next(r for r in runs if r.data.tags["arm"] == "mixup" and r.data.tags["seed"] == "43")
    c.set_terminated(mixup43.info.run_id, "FAILED")
    for path in lost:
        path.unlink()
    hflip42 = next(r for r in runs if r.data.tags["arm"] == "hflip" and r.data.tags["seed"] == "42")
    again = ablate(task_name=TASK, params_path=params)
    assert len(children(parent.info.run_id)) == 7  # one retrained: mixup/seed43
    assert all(path.exists() for path in lost)
    assert json.loads(lost[1].read_text())["run_id"] == hflip42.info.run_id  # recovered from MLflow, not retrained
    assert again["arms"]["hflip"] == table["arms"]["hflip"]


@pytest.mark.e2e
def test_ablation_on_a_local_dask_cluster_of_two_workers(small, harness):
    from distributed import LocalCluster

    from flows.ablation import ablate

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        params = small(
            **{
                "ablation.arms": ["cutout"],
                "ablation.seeds": 1,
                f"tasks.{TASK}.train.epochs": 1,
                "ablation.runner": {"kind": "dask", "dask_address": cluster.scheduler_address},
            }
        )
        metrics = ablate(task_name=TASK, params_path=params)
        workers = {
            json.loads(p.read_text())["worker"] for p in Path(f"outputs/{TASK}/ablation/runs").rglob("result.json")
        }
        assert workers and workers <= set(cluster.scheduler_info["workers"])  # ran on the cluster's workers
    assert list(metrics["arms"]) == ["baseline", "cutout"]


# ---------------------------------------------------------------- the search


@pytest.mark.e2e
def test_three_trial_search_prunes_and_writes_best_params(small, harness):
    import optuna
    import yaml

    from flows.search import search

    lr = f"tasks.{TASK}.train.optimizer.lr"
    params = small(
        **{
            f"tasks.{TASK}.train.epochs": 3,
            "search.trials": 3,
            "search.space": {
                "train.optimizer.lr": {"low": 1e-7, "high": 0.01, "log": True},
                "augment.rotation.degrees": {"low": 0, "high": 90},
            },
            # a learning trial first, then one that cannot learn (its metric stays at the initial one): pruned
            "search.enqueue": [
                {"train.optimizer.lr": 0.003, "augment.rotation.degrees": 10},
                {"train.optimizer.lr": 1e-7, "augment.rotation.degrees": 10},
            ],
            "search.pruner": {"name": "median", "startup_trials": 1, "warmup_epochs": 0},
            "search.runner": {"kind": "sequential"},
        }
    )
    summary = search(task_name=TASK, params_path=params)

    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{Path('optuna.db').resolve()}")
    states = [t.state.name for t in study.trials]
    assert len(states) == 3 and states[0] == "COMPLETE" and "PRUNED" in states[1:]
    seen = [(u.state.name, u.intermediate_values) for u in study.trials]
    assert len(study.trials[0].intermediate_values) == 3, seen  # the complete trial ran every epoch
    # the trial that cannot learn stopped before its last epoch (a sampled trial may still be pruned at its last)
    assert study.trials[1].state.name == "PRUNED" and len(study.trials[1].intermediate_values) < 3, seen
    assert summary["pruned"] >= 1 and summary["complete"] + summary["pruned"] == 3

    best = yaml.safe_load(Path(f"outputs/{TASK}/search/best_params.yaml").read_text())
    assert best["tasks"][TASK]["train"]["optimizer"]["lr"] == pytest.approx(summary["params"][lr])
    assert summary["params"][lr] == pytest.approx(study.best_params["train.optimizer.lr"])
    from flows.search import main

    assert main([TASK, "--dvc-args"]) == 0

    c = mlflow_client()
    exp = c.get_experiment_by_name("cv-" + TASK).experiment_id
    (parent,) = c.search_runs([exp], f"tags.kind = 'search' and tags.search_key = '{summary['study']}'")
    trials = {r.data.tags["trial"]: r for r in children(parent.info.run_id)}
    assert set(trials) == {"0", "1", "2"}
    assert {r.info.status for r in trials.values()} == {"FINISHED", "KILLED"}  # KILLED: pruned
    assert "test_accuracy" not in trials["0"].data.metrics  # the search never looks at the test split

    # the study is stored: asking again for three trials trains nothing more
    again = search(task_name=TASK, params_path=params)
    assert again["trials"] == 3 and again["best_trial"] == summary["best_trial"]


def test_a_search_stopped_mid_trial_queues_that_trial_again(small):
    import optuna

    from tasks.runners import search as search_stage

    params = small(
        **{"search.trials": 2, "search.space": {"train.optimizer.lr": {"low": 1e-4, "high": 1e-2, "log": True}}}
    )
    p = search_stage.plan(TASK, params)
    study = search_stage.open_study(p)
    done = study.ask(p.distributions())
    study.tell(done, 0.5)
    stopped = study.ask(p.distributions())  # the process died while this trial trained: it stays RUNNING
    assert search_stage.recover(search_stage.open_study(p), p) == 1
    study = search_stage.open_study(p)
    assert study.trials[stopped.number].state == optuna.trial.TrialState.FAIL
    assert search_stage.finished_count(study) == 1  # the interrupted trial does not count
    again = study.ask(p.distributions())  # the queued copy comes first, with the same values
    assert again.params == stopped.params
    # same values, same checkpoint folder: the retried trial resumes from its last epoch
    assert (
        search_stage.job(p, again.number, again.params, "0", "x").stage_name
        == search_stage.job(p, stopped.number, stopped.params, "0", "x").stage_name
    )
