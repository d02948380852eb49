"""Prefect flows ``predict-<task>``: a trained model on new images (the predict stage, tasks/use/predict.py).

    python -m flows.predict detection photos/ predictions/ [best|baseline|augmented|path|models:/cv-detection@champion]

Served with the training flows by ``flows/serve.py`` (deployment ``predict-<task>/default``):
    prefect deployment run predict-detection/default --param input=photos/ --param out=predictions/ --watch
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, task

from cv_models import TASKS
from tasks.use import predict as predict_stage

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

predict_task = task(predict_stage.run, name="predict")


def flow_name(task_name: str) -> str:
    return "predict-" + task_name.replace("_", "-")


def publish_summary(task_name: str, out: str) -> None:
    """The summary table in the Prefect UI (written by the stage even when some inputs failed)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    summary = Path(out) / "summary.md"
    if summary.exists() and FlowRunContext.get() is not None:
        create_markdown_artifact(
            markdown=summary.read_text(),
            key=f"{flow_name(task_name)}-summary",
            description=f"{task_name}: predictions written to {out}",
        )


def make_flow(task_name: str):
    def predict(
        input: str, out: str, model: str = "best", params_path: str = "params.yaml", strict: bool = False
    ) -> dict:
        try:
            return predict_task(task_name, model, input, out, params_path, strict=strict)
        finally:
            publish_summary(task_name, out)

    # served deployments load the flow by its entrypoint ``flows.predict.predict_<task>``
    predict.__name__ = predict.__qualname__ = f"predict_{task_name}"
    predict.__module__ = __name__
    return flow(
        name=flow_name(task_name),
        description=f"{task_name}: a trained model on a folder, file or glob of images",
        log_prints=True,
    )(predict)


FLOWS = {name: make_flow(name) for name in TASKS}
globals().update({f"predict_{name}": f for name, f in FLOWS.items()})

if __name__ == "__main__":
    import sys

    name, inputs, out = sys.argv[1:4]
    print(FLOWS[name](input=inputs, out=out, model=sys.argv[4] if len(sys.argv) > 4 else "best"))
