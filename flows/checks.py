"""A light flow for the work pool: validate one task's data (no training). It is also what the
two-worker test runs, as the cheapest real stage."""

from __future__ import annotations

import os
import socket

from prefect import flow

from tasks import validate


@flow(name="validate-data", log_prints=True)
def validate_data(task_name: str = "classification", params_path: str = "params.yaml") -> dict:
    report = validate.run(task_name, params_path)
    # where it ran: a team sees which worker's machine checked the data
    return {"task": task_name, "success": bool(report["success"]), "host": socket.gethostname(), "pid": os.getpid()}
