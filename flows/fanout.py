"""Run independent Prefect tasks side by side on the runner chosen in params (``runner:`` of the
ablation / search sections): in turn, a thread pool, a process pool, or a Dask cluster through
prefect-dask's ``DaskTaskRunner`` (a scheduler address, or a local cluster started for the run).

The runner is chosen at run time from params.yaml, so it is entered here as a context manager
inside the flow rather than fixed in the ``@flow`` decorator.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from tasks.runners.experiment_settings import RunnerConfig


def task_runner(cfg: RunnerConfig):
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    if cfg.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.max_workers)
    if cfg.kind == "processes":
        return ProcessPoolTaskRunner(max_workers=cfg.max_workers)
    if cfg.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.dask_address:
            return DaskTaskRunner(address=cfg.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": cfg.max_workers,
                "threads_per_worker": 1,
                "processes": cfg.dask_processes,
                "dashboard_address": None,
            }
        )
    return None


def share_temporary_server() -> None:
    """Without PREFECT_API_URL a flow runs against a temporary local server; worker processes would each
    start their own and their task runs would be lost. Point them (through the environment they
    inherit) at this process's server instead."""
    import os

    from prefect.settings import get_current_settings

    if get_current_settings().api.url or os.environ.get("PREFECT_API_URL"):
        return
    try:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer._instances.get(None)  # the temporary server of this process, if any
        if server is not None and server.server_process is not None:
            os.environ["PREFECT_API_URL"] = server.api_url
    except (ImportError, AttributeError):  # another Prefect version: workers start their own server
        return


class FanOut(AbstractContextManager):
    """``with FanOut(cfg) as fan: results = fan.map(prefect_task, [kwargs, ...])``.

    Results come back in order; a task that raised gives its exception in its place, so one failed
    arm or trial does not throw away the others (their results are already saved for a resume).
    """

    def __init__(self, cfg: RunnerConfig):
        self.cfg = cfg
        self.runner = task_runner(cfg)

    def __enter__(self):
        if self.cfg.kind == "processes" or (
            self.cfg.kind == "dask" and self.cfg.dask_processes and not self.cfg.dask_address
        ):
            share_temporary_server()
        if self.runner is not None:
            self.runner.__enter__()
        return self

    def __exit__(self, *exc):
        if self.runner is not None:
            return self.runner.__exit__(*exc)
        return None

    def map(self, prefect_task, kwargs_list: list[dict[str, Any]]) -> list[Any]:
        if self.runner is None:
            out = []
            for kwargs in kwargs_list:
                try:
                    out.append(prefect_task(**kwargs))
                except Exception as err:  # noqa: BLE001 - reported by the caller
                    out.append(err)
            return out
        futures = [self.runner.submit(prefect_task, kwargs) for kwargs in kwargs_list]
        out = []
        for future in futures:
            try:
                out.append(future.result())
            except Exception as err:  # noqa: BLE001
                out.append(err)
        return out
