"""The results table printed at the end of the main job: every task's test metrics side by side."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.chain import TRAINED
from tasks.paths import outputs

MODELS = ("dummy", *TRAINED)  # the columns of the table


def results_table(task_names: list[str]) -> str:
    from cv_models import TASKS

    lines = [
        f"| task | metric | {' | '.join(MODELS)} | registered model (version, champion) |",
        "|---|---|" + "---|" * len(MODELS) + "---|",
    ]
    for name in task_names:
        path = outputs(name, "evaluate") / "metrics.json"
        if not path.exists():
            lines.append(f"| {name} | (not evaluated yet) |" + " |" * len(MODELS) + " |")
            continue
        m = json.loads(path.read_text())
        metric = TASKS[name].primary_metric
        reg_path = outputs(name, "evaluate") / "registry.json"
        reg = json.loads(reg_path.read_text()) if reg_path.exists() else None
        registered = (
            f"{reg['name']} v{reg['version']} ({reg['stage']}); {reg['alias']}: v{reg['champion_version']}"
            if reg
            else "(not registered)"
        )
        lines.append(
            f"| {name} | test {metric} | " + " | ".join(f"{m[k][metric]:.4f}" for k in MODELS) + f" | {registered} |"
        )
    return "\n".join(lines)


def main(params_path: str | Path = "params.yaml") -> str:
    from tasks.config import load_params
    from tasks.track.tracking import tracking_uri

    params = load_params(params_path)
    table = results_table(list(params.tasks))
    uri = tracking_uri(params)
    text = (
        f"\nResults on the test split (outputs/<task>/evaluate/):\n\n{table}\n\n"
        f"Compare runs in the MLflow UI (one row per pipeline run):\n  make mlflow-ui   (= .venv/bin/mlflow ui "
        f"--backend-store-uri {params.tracking.uri} --host 127.0.0.1 --port 5000)\n"
        f"  then open the runs-table link it prints for each task  (store: {uri})\n"
    )
    print(text)
    return text
