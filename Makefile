# acodm: two commands do all the set-up on a fresh machine (Python 3.11+ and make).
#   make demo   create .venv, install, build + prepare the demo corpus, run the demo job
#   make test   create .venv, install, run ruff and the test suite (all but the `heavy` Tune sweeps)
#   make test-heavy   the heavy Tune sweep tests (CI runs both)
#
# Torch: with no NVIDIA GPU visible (no nvidia-smi), the install pins the CPU build (torch==2.13.0,
# which this kind of machine serves from a local wheel). With a GPU, set TORCH_SPEC to the CUDA build
# you want, e.g.  make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# or install torch into .venv yourself first: a torch that satisfies pyproject's range is kept.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= data/demo
PYTEST_ARGS ?=

export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test test-heavy lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif [ -n "$(HAS_GPU)" ]; then echo "GPU found: installing $(TORCH_SPEC) (override TORCH_SPEC for your CUDA build)"; $(PIP) install -q $(TORCH_SPEC); \
	else echo "no GPU: installing CPU torch ($(TORCH_SPEC))"; $(PIP) install -q $(TORCH_SPEC); fi
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/acodm data demo $(DEMO_DIR)/raw
	$(VENV)/bin/acodm data prepare configs/demo.yaml
	$(VENV)/bin/acodm train configs/demo.yaml
	$(VENV)/bin/acodm train configs/demo.yaml --set name=demo-uniform --set agent.kind=uniform
	@echo
	@echo "demo done:"
	@echo "  runs        runs/demo (AC-ODM) and runs/demo-uniform (uniform baseline)"
	@echo "  report      runs/demo-report/report.html (and report.md, plots/)"
	@echo "  MLflow      $(CURDIR)/$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --host 127.0.0.1"
	@echo
	@# last: the comparison table and the verdict (acodm report prints them)
	$(VENV)/bin/acodm -q report runs/demo runs/demo-uniform --out runs/demo-report

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest -q -m "not heavy" $(PYTEST_ARGS)

# whole Ray Tune sweeps (ASHA, PBT, kill + resume): several minutes each on 2 cores
test-heavy: install
	$(PY) -m pytest -q -m heavy $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs data/demo .pytest_cache
