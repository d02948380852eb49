"""Stages that need no model start without torch (issue 33): ``python -m tasks generate`` imports neither torch
nor torchvision, and still reports bad params in one line."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, tiny_overrides, write_params

CHECK = (
    "import sys, runpy; sys.argv = ['tasks'] + sys.argv[1:]\n"
    "try:\n    runpy.run_module('tasks', run_name='__main__')\n"
    "finally:\n    print('heavy:', sorted(m for m in ('torch', 'torchvision', 'mlflow', 'great_expectations', "
    "'prefect') if m in sys.modules))"
)


def _generate(folder, overrides: dict) -> subprocess.CompletedProcess:
    params = write_params(folder, overrides)
    return subprocess.run(
        [sys.executable, "-c", CHECK, "generate", "--params", str(params)],
        cwd=folder,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_generate_starts_without_torch(tmp_path):
    run = _generate(tmp_path, tiny_overrides(**{"shapes.out_dir": str(tmp_path / "shapes")}))
    assert run.returncode == 0, run.stderr
    assert "heavy: []" in run.stdout
    assert (tmp_path / "shapes" / "classification").is_dir()


def test_generate_reports_bad_params_in_one_line(tmp_path):
    run = _generate(tmp_path, tiny_overrides(**{"shapes.scenes.num_imgs": 3}))
    assert run.returncode == 1
    assert run.stderr.startswith("error: ") and "num_imgs" in run.stderr and "Traceback" not in run.stderr
    assert "heavy: []" in run.stdout
