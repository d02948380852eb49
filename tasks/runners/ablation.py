"""One improvement at a time: each named change is applied ALONE on top of the baseline and trained
over several seeds; the test metric's mean and std per change, and its difference from the baseline
with a 95% Welch confidence interval (the table of the CutMix paper, with error bars).

The baseline is the task's section of params.yaml with every augmentation switched off (plus
``ablation.baseline`` overrides); "every augmentation" is read from the task's augment schema (its
Switch fields, which the task's augmentation registry must match), so detection's mosaic and instance
segmentation's copy-paste are off too and a new augmentation cannot be forgotten. A change is a named
set of dotted overrides relative to ``tasks.<task>``: each augmentation of the task switched on, the
registry :data:`CHANGES` below, or your own under ``ablation.changes``. Each arm's effective settings
are compared with the baseline's; an arm whose difference is not exactly its named change stops the
plan, and the table states each arm's difference.

Fan-out, resume and MLflow: :mod:`flows.ablation` (flow ``ablate``) plans the jobs here, trains them
on its task runner through :func:`tasks.runners.experiments.train_and_score`, and summarises here. Finished
arm+seed runs are kept as ``outputs/<task>/ablation/runs/<arm>/seed<k>/result.json`` (and as finished
MLflow child runs), so a stopped ablation resumes without retraining them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cv_models.settings import diff_text, flat, settings_diff
from tasks.config import ConfigError, TaskConfig, config_hash, load_params
from tasks.runners.experiment_settings import AblationConfig
from tasks.runners.experiments import NOT_LEARNING, TrainJob, learning_hash, task_keys, worker_threads
from tasks.paths import outputs

# name -> dotted overrides relative to tasks.<task>; each is ONE change on top of the baseline. Every
# augmentation of the task is a change too (augmentation_changes), read from its schema.
CHANGES: dict[str, dict[str, Any]] = {
    # input normalisation (the baseline uses the task's `normalization`)
    "no_norm": {"normalization": "none"},
    "mean_image": {"normalization": "mean_image"},
    "per_channel_mean": {"normalization": "per_channel_mean"},
    "per_channel_std": {"normalization": "per_channel_std"},
    # loss
    "label_smoothing": {"train.loss.label_smoothing": 0.1},
    # optimiser and learning-rate schedule
    "sgd": {"train.optimizer.name": "sgd"},
    "adam": {"train.optimizer.name": "adam"},
    "adamw": {"train.optimizer.name": "adamw"},
    "constant_lr": {"train.scheduler.name": "none"},
    "step_lr": {"train.scheduler.name": "step"},
    "cosine_lr": {"train.scheduler.name": "cosine"},
    "onecycle_lr": {"train.scheduler.name": "onecycle"},
    "warmup": {"train.scheduler.warmup_epochs": 1},
    # initialisation: torchvision's pretrained weights (a torchvision model and a cached or
    # downloadable weights file) against random initialisation
    "pretrained": {"model.weights": "torchvision:DEFAULT"},
    "random_init": {"model.weights": "none"},
    # ImageNet weights found offline for the model's timm/torchvision network or encoder (cv_models/weights.py),
    # with their own input normalisation: on a base with weights none, pretrained against random initialisation
    "imagenet": {"model.weights": "imagenet"},
}
BASELINE = "baseline"
RUNTIME_KEYS = NOT_LEARNING  # how a run executes, not what it learns: not part of an arm's difference


def augmentation_changes(task_name: str) -> dict[str, dict[str, Any]]:
    """One change per augmentation the task declares (``augment.<name>.enabled: true``)."""
    from cv_models import TASKS

    if task_name not in TASKS:
        return {}
    return {name: {f"augment.{name}.enabled": True} for name in TASKS[task_name].augment_schema().switch_names()}


def baseline_overrides(task_name: str) -> dict[str, Any]:
    """Every augmentation of the task switched off (relative to ``tasks.<task>``)."""
    return {f"augment.{name}.enabled": False for name in augmentation_changes(task_name)}


def known_changes(task_name: str, own: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    return {**augmentation_changes(task_name), **CHANGES, **(own or {})}


@dataclass
class Arm:
    name: str
    changes: dict[str, Any]  # relative to tasks.<task>
    seed: int
    overrides: dict[str, Any]  # full dotted keys for load_params
    key: str  # learning hash: same key, same outcome -> reuse
    diff: dict[str, tuple[Any, Any]] | None = None  # effective settings that differ from the baseline's

    @property
    def label(self) -> str:
        return f"{self.name}/seed{self.seed}"


@dataclass
class Plan:
    task_name: str
    primary_metric: str
    config: AblationConfig
    arms: list[Arm]
    key: str  # identifies the baseline: the parent MLflow run
    params_path: str
    overrides: dict[str, Any]
    diffs: dict[str, dict[str, tuple[Any, Any]]] | None = None  # arm name -> its difference from the baseline

    @property
    def out_dir(self) -> Path:
        return outputs(self.task_name, "ablation")

    def result_path(self, arm: Arm) -> Path:
        return self.out_dir / "runs" / arm.name / f"seed{arm.seed}" / "result.json"


def check_arms(cfg: AblationConfig, task_name: str = "") -> AblationConfig:
    """``ablation:`` (typed when params.yaml was loaded) with its arms checked against the task's known changes."""
    known = known_changes(task_name, cfg.changes)
    unknown = [a for a in cfg.arms if a not in known and a != BASELINE]
    if unknown:
        raise ConfigError(
            f"ablation.arms: unknown change(s) {unknown}; known changes: {sorted(known)} "
            f"(define your own under ablation.changes as name: {{dotted.key: value}})"
        )
    duplicated = sorted({a for a in cfg.arms if cfg.arms.count(a) > 1})
    if duplicated:
        raise ConfigError(f"ablation.arms: {duplicated} listed more than once")
    return cfg


def plan(
    task_name: str,
    params_path: str | Path = "params.yaml",
    overrides: dict[str, Any] | None = None,
    build_models: bool = True,
) -> Plan:
    """Check everything before anything trains: the arms exist, each arm's params are valid and its model builds.

    Building a model needs the data (its classes): ``build_models=False`` checks the settings alone
    (before the data is generated), then call again once it is there.
    """
    overrides = dict(overrides or {})
    params = load_params(params_path, overrides)
    base_cfg = params.task(task_name)  # unknown task -> ConfigError naming the tasks present
    cfg = check_arms(params.ablation, task_name)
    known = known_changes(task_name, cfg.changes)
    baseline = baseline_settings(task_name, cfg, base_cfg)
    names = [BASELINE] + [a for a in cfg.arms if a != BASELINE]
    arms, primary, base_dump, base_cfg_arm, diffs = [], None, None, None, {}
    for name in names:
        changes = {} if name == BASELINE else dict(known[name])
        dotted = {**overrides, **task_keys(task_name, {**baseline, **changes})}
        arm_cfg, task = arm_config(task_name, name, changes, params_path, dotted, build_models)
        primary = task.primary_metric
        if name == BASELINE:
            base_dump, base_cfg_arm = arm_cfg.model_dump(mode="json"), arm_cfg
            check_baseline(task_name, arm_cfg)
        diff = settings_diff(base_cfg_arm, arm_cfg, ignore=RUNTIME_KEYS)
        check_one_change(name, changes, diff)
        diffs[name] = diff
        arms += seeded_arms(name, changes, dotted, arm_cfg, diff, params.seed, cfg.seeds)
    key = config_hash({"task": task_name, "baseline": learning_hash(base_dump, 0)})
    return Plan(task_name, primary, cfg, arms, key, str(Path(params_path).resolve()), overrides, diffs)


def baseline_settings(task_name: str, cfg: AblationConfig, base_cfg: TaskConfig) -> dict[str, Any]:
    """The baseline arm's settings: every augmentation of the task off (their strengths stay as in params.yaml),
    then ``ablation.baseline``, and the runner's thread share when the task leaves ``train.num_threads`` to torch."""
    baseline = baseline_overrides(task_name)
    baseline.update(cfg.baseline)
    threads = worker_threads(cfg.runner)
    if threads and base_cfg.train.num_threads == 0:
        baseline.setdefault("train.num_threads", threads)
    return baseline


def arm_config(task_name: str, name: str, changes: dict, params_path: str | Path, dotted: dict, build_models: bool):
    """The arm's task settings and task, its model built with ``build_models``; an arm that is not a valid setting
    raises a ConfigError naming it."""
    from cv_models import get_task

    try:
        arm_params = load_params(params_path, dotted)
        arm_cfg = arm_params.task(task_name)
        task = get_task(task_name, arm_cfg)
        if build_models:  # unknown model, missing weights: fail now, not after the other arms trained
            task.build_model()
    except Exception as err:
        raise ConfigError(
            f"ablation arm {name!r} ({changes or 'the baseline'}) is not a valid setting for task {task_name!r}: {err}"
        ) from None
    return arm_cfg, task


def check_baseline(task_name: str, arm_cfg: TaskConfig) -> None:
    on = arm_cfg.augment.enabled_names()
    if on:  # ablation.baseline switched one back on: the baseline would not be "every augmentation off"
        raise ConfigError(
            f"ablation baseline of task {task_name!r} has augmentations on: {on} "
            f"(ablation.baseline must not switch any on; make it an arm instead)"
        )


def seeded_arms(
    name: str, changes: dict, dotted: dict, arm_cfg: TaskConfig, diff: dict, first_seed: int, seeds: int
) -> list[Arm]:
    """The arm once per seed (``first_seed``, the next ones), each run keyed by its learning settings and seed."""
    arms = []
    for i in range(seeds):
        seed = first_seed + i
        arms.append(
            Arm(
                name,
                changes,
                seed,
                {**dotted, "seed": seed},
                learning_hash(arm_cfg.model_dump(mode="json"), seed),
                diff,
            )
        )
    return arms


def check_one_change(name: str, changes: dict[str, Any], diff: dict[str, tuple[Any, Any]]) -> None:
    """An arm must differ from the baseline in exactly its named change: something, and nothing else."""
    if name == BASELINE:
        return
    named = set(flat({k: v for k, v in changes.items()}))  # a dict value names every key under it
    outside = sorted(k for k in diff if not any(k == n or k.startswith(n + ".") for n in named))
    if not diff:
        raise ConfigError(f"ablation arm {name!r} ({changes}) changes nothing: the baseline already has that setting")
    if outside:
        raise ConfigError(
            f"ablation arm {name!r} is not one change: besides {sorted(named)} it also differs from the "
            f"baseline in {outside} ({diff_text({k: diff[k] for k in outside})})"
        )


def job(p: Plan, arm: Arm, experiment_id: str, parent_run_id: str) -> TrainJob:
    return TrainJob(
        task_name=p.task_name,
        params_path=p.params_path,
        overrides=arm.overrides,
        stage_name=f"ablation/{arm.name}/seed{arm.seed}",
        out_dir=str(Path.cwd() / p.result_path(arm).parent),
        project_dir=str(Path.cwd()),
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        run_name=f"{arm.name} seed {arm.seed}",
        keep_model=p.config.keep_models,
        tags={
            "kind": "ablation-arm",
            "arm": arm.name,
            "seed": str(arm.seed),
            "arm_key": arm.key,
            "ablation_key": p.key,
            "changes": json.dumps(arm.changes),
            "diff_vs_baseline": diff_text(arm.diff or {})[:5000],
        },
    )


# ---------------------------------------------------------------- resume


def finished(p: Plan, arm: Arm, runs_by_key: dict[str, Any] | None = None) -> dict | None:
    """The result of an arm+seed already trained with the same settings (result file, else a finished MLflow run)."""
    path = p.result_path(arm)
    if path.exists():
        result = json.loads(path.read_text())
        if result.get("arm_key") == arm.key:
            return result
    run = (runs_by_key or {}).get(arm.key)
    if run is not None:
        metrics = dict(run.data.metrics)
        result = {"arm": arm.name, "seed": arm.seed, "arm_key": arm.key, "run_id": run.info.run_id, **metrics}
        save_result(p, arm, result)
        return result
    return None


def finished_runs(p: Plan, client_runs: list) -> dict[str, Any]:
    """Finished MLflow child runs carrying the test metric, by arm key (newest wins)."""
    want = f"test_{p.primary_metric}"
    out: dict[str, Any] = {}
    for run in client_runs:
        key = run.data.tags.get("arm_key")
        if key and run.info.status == "FINISHED" and want in run.data.metrics and key not in out:
            out[key] = run
    return out


def save_result(p: Plan, arm: Arm, result: dict) -> None:
    from tasks.paths import atomic_write_bytes

    atomic_write_bytes(p.result_path(arm), (json.dumps(result, indent=2, default=float) + "\n").encode())


# ---------------------------------------------------------------- the table


def welch_interval(a: list[float], b: list[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Difference of means ``mean(a) - mean(b)`` with Welch's t-interval: (diff, low, high, degrees of freedom).

    Unequal variances, Welch-Satterthwaite degrees of freedom. Fewer than two values on a side: no interval (nan).
    """
    from scipy import stats

    na, nb = len(a), len(b)
    diff = sum(a) / na - sum(b) / nb
    if na < 2 or nb < 2:
        return diff, math.nan, math.nan, math.nan
    va = sum((x - sum(a) / na) ** 2 for x in a) / (na - 1)
    vb = sum((x - sum(b) / nb) ** 2 for x in b) / (nb - 1)
    se2 = va / na + vb / nb
    if se2 == 0:  # every seed gave the same figure on both sides: the difference is exact
        return diff, diff, diff, math.inf
    df = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    half = stats.t.ppf(0.5 + confidence / 2, df) * math.sqrt(se2)
    return diff, diff - half, diff + half, df


def table(results: dict[str, list[float]], baseline: str = BASELINE) -> pd.DataFrame:
    """One row per change: seeds, mean, std, difference from the baseline, 95% CI, and '*' where it excludes 0."""
    base = results[baseline]
    rows = []
    for name, values in results.items():
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
        row = {"change": name, "seeds": n, "mean": mean, "std": std}
        if name == baseline:
            row.update(diff=0.0, ci_low=math.nan, ci_high=math.nan, df=math.nan, significant="")
        else:
            diff, low, high, df = welch_interval(values, base)
            row.update(
                diff=diff,
                ci_low=low,
                ci_high=high,
                df=df,
                significant="*" if not math.isnan(low) and (low > 0 or high < 0) else "",
            )
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(
    df: pd.DataFrame,
    metric: str,
    task_name: str,
    seconds: float | None = None,
    settings: dict[str, dict[str, tuple[Any, Any]]] | None = None,
) -> str:
    """The table; ``settings``: each arm's effective settings that differ from the baseline's (a column)."""

    def pct(v: float, sign: bool = False) -> str:
        return "" if math.isnan(v) else (f"{100 * v:+.2f}" if sign else f"{100 * v:.2f}")

    lines = [
        f"# {task_name}: one change at a time (test {metric}, %)",
        "",
        "| change | seeds | mean | std | diff vs baseline | 95% CI (Welch) | | settings changed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in df.itertuples(index=False):
        ci = "" if math.isnan(r.ci_low) else f"[{pct(r.ci_low, True)}, {pct(r.ci_high, True)}]"
        diff = "" if r.change == BASELINE else pct(r.diff, True)
        changed = (
            "every augmentation off"
            if r.change == BASELINE
            else "`" + diff_text((settings or {}).get(r.change, {})) + "`"
            if settings is not None
            else ""
        )
        lines.append(
            f"| {r.change} | {r.seeds} | {pct(r.mean)} | {pct(r.std)} | {diff} | {ci} | {r.significant} | {changed} |"
        )
    lines += [
        "",
        "`*`: the 95% interval of the difference excludes zero. Model selection on the validation split; "
        "the figures are on the test split.",
    ]
    if seconds is not None:
        lines.append(f"Wall time of this run: {seconds / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def figure(df: pd.DataFrame, metric: str, path: Path) -> Path:
    """Difference from the baseline with its 95% interval, one bar per change (a forest plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = df[df["change"] != BASELINE]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(rows) + 1.5))
    y = list(range(len(rows)))[::-1]
    lows = (rows["diff"] - rows["ci_low"]).fillna(0).clip(lower=0)
    highs = (rows["ci_high"] - rows["diff"]).fillna(0).clip(lower=0)
    colours = [
        "tab:green" if s == "*" and d > 0 else "tab:red" if s == "*" else "tab:gray"
        for s, d in zip(rows["significant"], rows["diff"])
    ]
    for yi, d, lo, hi, c in zip(y, rows["diff"], lows, highs, colours):
        ax.errorbar([100 * d], [yi], xerr=[[100 * lo], [100 * hi]], fmt="none", ecolor=c, capsize=4)
    ax.scatter(100 * rows["diff"], y, c=colours, zorder=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, rows["change"])
    ax.set_xlabel(f"test {metric}: difference from the baseline (points, 95% CI)")
    ax.set_title("One change at a time")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summarise(p: Plan, results: list[dict], seconds: float | None = None) -> tuple[pd.DataFrame, dict, str]:
    """The table from the arm+seed results; writes metrics.json, table.csv, table.md and ablation.png."""
    metric = f"test_{p.primary_metric}"
    by_arm: dict[str, list[float]] = {}
    for arm, res in zip(p.arms, results):
        by_arm.setdefault(arm.name, []).append(float(res[metric]))
    df = table(by_arm)
    markdown = to_markdown(df, p.primary_metric, p.task_name, seconds, p.diffs)
    out = p.out_dir
    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "metric": metric,
        "seeds": p.config.seeds,
        "settings_changed": {name: {k: list(v) for k, v in d.items()} for name, d in (p.diffs or {}).items()},
        "arms": {
            r.change: {k: finite(v) for k, v in r._asdict().items() if k != "change"}
            for r in df.itertuples(index=False)
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    df.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(markdown)
    figure(df, p.primary_metric, out / "ablation.png")
    return df, metrics, markdown


def finite(value: Any) -> Any:
    """NaN (one seed) and infinity (no spread) have no JSON spelling: null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
