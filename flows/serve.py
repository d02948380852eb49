"""Serve every task's flow as a Prefect deployment (needs PREFECT_API_URL pointing at a server).

    python -m flows.serve            # deployments train-<task>/default and predict-<task>/default for every task in params.yaml
Then, from another shell with the same PREFECT_API_URL:
    prefect deployment run train-classification/default --param epochs=1 --watch
    prefect deployment run predict-classification/default --param input=photos/ --param out=predictions/ --watch
"""

from __future__ import annotations

import os
import sys

from prefect import serve
from prefect.types.entrypoint import EntrypointType

from flows.pipeline import FLOWS
from flows.predict import FLOWS as PREDICT_FLOWS
from tasks.config import load_params

DEPLOYMENT_NAME = "default"


def deployments(params_path: str = "params.yaml"):
    names = [n for n in load_params(params_path).tasks if n in FLOWS]
    # module entrypoints (flows.pipeline.train_<task>) load from any working folder with the package importable
    return [
        flows[n].to_deployment(
            name=DEPLOYMENT_NAME, parameters={"params_path": params_path}, entrypoint_type=EntrypointType.MODULE_PATH
        )
        for flows in (FLOWS, PREDICT_FLOWS)
        for n in names
    ]


def main() -> None:
    if not os.environ.get("PREFECT_API_URL"):
        sys.exit("PREFECT_API_URL is not set: start a server (make serve does both) and point PREFECT_API_URL at it")
    serve(*deployments(sys.argv[1] if len(sys.argv) > 1 else "params.yaml"))


if __name__ == "__main__":
    main()
