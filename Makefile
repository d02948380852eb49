# Two commands do all the set-up on a fresh clone:
#   make run    create .venv if missing, then `dvc repro` on the embedded data and print the results
#   make test   create .venv if missing, then run the test suite
VENV        ?= .venv
PYTHON      ?= python3
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
PORT        ?= 4200
MLFLOW_PORT ?= 5000

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_HOME ?= $(CURDIR)/.prefect
export GX_ANALYTICS_ENABLED := False
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: run test env serve mlflow-ui benchmark ablate search clean

env: $(STAMP)

# torch 2.14.1 / torchvision 0.29.1 are pinned in pyproject.toml
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

run: $(STAMP)
	scripts/init_repo.sh
	dvc repro
	python -m tasks report

test: $(STAMP)
	python -m pytest

# Prefect server on 127.0.0.1:$(PORT) plus every task's flow served as a deployment (Ctrl-C stops both)
serve: $(STAMP)
	scripts/serve.sh $(PORT)

# prints each task's runs-table link (one row per pipeline run), then serves the UI
mlflow-ui: $(STAMP)
	@python -m tasks.mlflow_view $(MLFLOW_PORT) || true
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

# training-loop overhead against a bare PyTorch loop, per task (ratios; run on an otherwise idle machine)
benchmark: $(STAMP)
	python benchmarks/bench_train_step.py
	python benchmarks/bench_segmentation_step.py
	python benchmarks/bench_detection_step.py
	python benchmarks/bench_instance_segmentation_step.py

TASK ?= classification
ablate: $(STAMP)
	python -m flows.ablation $(TASK)

search: $(STAMP)
	python -m flows.search $(TASK)

clean:
	rm -rf outputs models checkpoints data/shapes .prefect
