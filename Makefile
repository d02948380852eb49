# Two commands do all the set-up on a fresh clone:
#   make run    create .venv if missing, then `dvc repro` on the embedded data, two tasks at once (python -m tasks repro), and print the results
#   make test   create .venv if missing, then lint (ruff, mypy), build the docs (--strict) and run the test suite
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
export NO_MKDOCS_2_WARNING := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 300

.PHONY: run test test-all init lint docs docs-check docs-serve env serve worker deploy mlflow-server mlflow-ui benchmark gpu-benchmark ablate search clean

env: $(STAMP)

# torch 2.14.1 / torchvision 0.29.1 are pinned in pyproject.toml
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

run: $(STAMP)
	scripts/init_repo.sh
	python -m tasks repro $(if $(JOBS),--jobs $(JOBS))
	python -m tasks report

test: $(STAMP) lint docs-check
	python -m pytest

# ruff (lint rules, format check; line length in pyproject.toml) and mypy, strict on the settings, the config and the task interface
lint: $(STAMP)
	ruff check .
	ruff format --check .
	mypy

# the docs site (mkdocs.yml, docs/): `make docs` builds it into site/, `make docs-serve` serves it with live reload;
# the test target builds it with --strict into a temporary folder (a broken link or a page left out of the nav fails)
docs: $(STAMP)
	mkdocs build --strict --site-dir site

docs-check: $(STAMP)
	@site=$$(mktemp -d) && trap 'rm -rf "$$site"' EXIT && mkdocs build --strict --quiet --site-dir "$$site"

DOCS_PORT ?= 8000
docs-serve: $(STAMP)
	mkdocs serve --dev-addr 127.0.0.1:$(DOCS_PORT)

# your own data: find its layout, propose settings for the budget, write tasks.<task> of params.yaml, validate
#   make init DATA=path/to/dataset [INIT_ARGS="--task detection --budget-minutes 10 --kind street"]
init: $(STAMP)
	@test -n "$(DATA)" || { echo "usage: make init DATA=path/to/dataset [INIT_ARGS='--budget-minutes 10 ...']"; exit 2; }
	python -m tasks init $(DATA) $(INIT_ARGS)

# everything, the six tests marked slow included (a few minutes more; not timed since the sixth joined)
test-all: $(STAMP)
	python -m pytest -m "slow or not slow"

# Prefect server on 127.0.0.1:$(PORT) plus every task's flow served as a deployment (Ctrl-C stops both)
serve: $(STAMP)
	scripts/serve.sh $(PORT)

# Team setup (docs/scaling-out.md): deployments of prefect.yaml on the work pool $(POOL), and a worker
# that runs them; PREFECT_API_URL must point at the team's server (e.g. http://server:4200/api)
POOL ?= cv-pool
deploy: $(STAMP)
	prefect work-pool inspect $(POOL) >/dev/null 2>&1 || prefect work-pool create $(POOL) --type process
	prefect --no-prompt deploy --all

worker: $(STAMP)
	prefect worker start --pool $(POOL)

# MLflow tracking server: SQL backend, artifacts proxied into mlartifacts-server/ (set tracking.uri: http://127.0.0.1:$(MLFLOW_PORT))
MLFLOW_HOST ?= 127.0.0.1
mlflow-server: $(STAMP)
	mlflow server --backend-store-uri sqlite:///mlflow-server.db --serve-artifacts --artifacts-destination mlartifacts-server \
		--host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

# prints each task's runs-table link (one row per pipeline run), then serves the UI
mlflow-ui: $(STAMP)
	@python -m tasks.track.mlflow_view $(MLFLOW_PORT) || true
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

# the Model Registry's champion of $(TASK) over HTTP, requests over params.yaml's serving.max_request_mb refused (413)
.PHONY: serve-model
serve-model: $(STAMP)
	python -m tasks.use.serve_model --task $(TASK)

# training-loop overhead against a bare PyTorch loop, per task (ratios; run on an otherwise idle machine)
benchmark: $(STAMP)
	python benchmarks/bench_train_step.py
	python benchmarks/bench_segmentation_step.py
	python benchmarks/bench_detection_step.py
	python benchmarks/bench_instance_segmentation_step.py

# images/s in fp32 vs bf16/fp16 with channels_last, then the main job (a GPU machine; --dry-run on a CPU)
gpu-benchmark: $(STAMP)
	python benchmarks/gpu.py

TASK ?= classification
ablate: $(STAMP)
	python -m flows.ablation $(TASK)

search: $(STAMP)
	python -m flows.search $(TASK)

clean:
	rm -rf outputs models checkpoints data/shapes .prefect
