# `make demo` and `make test` each set themselves up on a fresh machine: a .venv, torch, megagpt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: install this torch before the package; a bare `torch` requirement in an empty
# environment resolves to a multi-GB CUDA build. An existing torch (say a CUDA one) is kept.
TORCH_CPU ?= torch==2.13.0
DEMO_DATA := data/shakespeare

.PHONY: setup demo test lint clean gpu-check docs

setup: $(VENV)/.megagpt-installed

$(VENV)/.megagpt-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_CPU)"
	$(PY) -m pip install -e ".[dev]"
	# mpi4py (the mpirun launch path and its test) builds against a system MPI: only where one is installed.
	if command -v mpicc >/dev/null; then $(PY) -m pip install -e ".[mpi]"; fi
	touch $@

# The demo trains with tensor parallelism 2 x pipeline parallelism 2: four CPU processes (gloo).
demo: setup
	$(PY) tools/prepare_demo_data.py --out-dir $(DEMO_DATA)
	$(PY) -m torch.distributed.run --standalone --nproc_per_node 4 launcher/pretrain.py \
		--config configs/demo-cpu.yaml parallel.tp=2 parallel.pp=2
	$(PY) tools/demo_report.py --run runs/demo-cpu --data $(DEMO_DATA)
	$(PY) tools/plot.py runs/demo-cpu --panels loss --out runs/demo-cpu/loss.png

test: setup
	$(PY) -m pytest -q

# The prepared check for a lent GPU (tools/gpu_check.py): at most 8 minutes, report in runs/gpu-check/. It runs
# with the first of .venv and the machine's python3 whose torch sees a GPU (make setup pins a CPU torch; GPU
# machines come with their CUDA torch, often offline), else with .venv.
GPU_PY = $(or $(shell for p in $(PY) $(PYTHON); do $$p -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null && echo $$p && break; done),$(PY))
gpu-check:
	$(GPU_PY) tools/gpu_check.py --out runs/gpu-check

# docs/config.md is generated from megagpt/config.py's help text; a test fails when it is stale.
docs: setup
	$(PY) tools/gen_config_docs.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs data build
