"""The schemas of the experiment sections of params.yaml: ``ablation:``, ``search:`` and the runner both use.

They live apart from the runners (``tasks/runners/ablation.py``, ``tasks/runners/search.py``, ``tasks/runners/experiments.py``) so that
``tasks/config.py`` can check these sections when it loads params.yaml without importing the runners, which
import it: no import circle. This module imports only the shared schema.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cv_models.settings import Strict


class RunnerConfig(Strict):
    """Where the independent trainings (ablation arms x seeds, search trials) run."""

    kind: Literal["sequential", "threads", "processes", "dask"] = "threads"
    max_workers: int = Field(2, ge=1, le=256)
    dask_address: str | None = None  # tcp://host:8786 of a running scheduler; None = a local cluster
    dask_processes: bool = True  # local cluster only: worker processes (True) or threads of this process

    @model_validator(mode="after")
    def _address(self):
        if self.dask_address and self.kind != "dask":
            raise ValueError(f"dask_address is set but kind is {self.kind!r}; set kind: dask to use the cluster")
        return self


class AblationConfig(Strict):
    """``ablation:`` in params.yaml."""

    seeds: int = Field(3, ge=1, le=100)  # seeds params.seed, params.seed+1, ...
    arms: list[str] = ["hflip", "mixup", "cutmix", "cutout"]  # the baseline row is always added
    changes: dict[str, dict[str, Any]] = {}  # your own named changes: name -> {dotted.key: value}
    baseline: dict[str, Any] = {}  # dotted overrides every arm shares (on top of all augmentations off)
    keep_models: bool = False  # keep models/<task>/ablation/<arm>/seed<k>/model.pt
    runner: RunnerConfig = RunnerConfig()


class SearchParam(Strict):
    """One dimension: ``{low, high, log}`` for float/int, ``{choices}`` for categorical."""

    type: Literal["float", "int", "categorical"] = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _range(self):
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical dimension needs a non-empty list of choices")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} dimension needs low and high")
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.type == "categorical":
            return CategoricalDistribution(self.choices)
        if self.type == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def corners(self) -> list[Any]:
        """The values that must all be valid settings (checked before the first trial)."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]


class PrunerConfig(Strict):
    name: Literal["median", "percentile", "none"] = "median"
    startup_trials: int = Field(2, ge=0)  # no pruning until this many trials finished
    warmup_epochs: int = Field(1, ge=0)  # no pruning within a trial's first epochs
    percentile: float = Field(50.0, gt=0, lt=100)  # percentile pruner: prune below this percentile

    def build(self):
        import optuna

        if self.name == "none":
            return optuna.pruners.NopPruner()
        if self.name == "percentile":
            return optuna.pruners.PercentilePruner(
                self.percentile, n_startup_trials=self.startup_trials, n_warmup_steps=self.warmup_epochs
            )
        return optuna.pruners.MedianPruner(n_startup_trials=self.startup_trials, n_warmup_steps=self.warmup_epochs)


class SearchConfig(Strict):
    """``search:`` in params.yaml."""

    trials: int = Field(20, ge=1, le=100_000)  # finished trials (complete, pruned or failed) the study should hold
    storage: str = "sqlite:///optuna.db"  # Optuna RDB storage; a relative SQLite path is inside the project
    study_name: str | None = None  # None: <task>-<hash of the base settings and the space>
    sampler_seed: int | None = None  # None: params.seed
    pruner: PrunerConfig = PrunerConfig()
    enqueue: list[dict[str, Any]] = []  # trials to run first (e.g. today's params), keys of the space
    space: dict[str, SearchParam] = {}
    runner: RunnerConfig = RunnerConfig()

    @model_validator(mode="after")
    def _enqueue(self):
        for i, trial in enumerate(self.enqueue):
            unknown = sorted(set(trial) - set(self.space))
            if unknown:
                raise ValueError(f"enqueue[{i}] names {unknown}, which are not keys of search.space")
        if not self.space:
            raise ValueError("search.space is empty: name at least one dotted key to search")
        return self
