# The CPU torch wheel on this machine is pinned so pip never pulls a multi-GB CUDA build.
# GPU users: install the torch build for your CUDA first, then `pip install -e .`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: install test demo bench lint clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH_PIN)
	touch $@

install: $(BIN)/.installed

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

demo: install
	$(BIN)/kdcache demo

bench: install
	$(BIN)/python benchmarks/bench_storage.py --quick

lint: install
	$(BIN)/ruff check pipeline storage tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
