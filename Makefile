# Two commands: `make demo` (install + run the main job on bundled data) and `make test` (install + tests).
# Each creates its virtualenv when missing. A GPU user installs their CUDA torch into .venv first
# (or sets TORCH=...); the default spec admits the CPU wheel 2.13.0.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: install demo test test-fast bench clean

$(BIN)/geoseg: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/geoseg

install: $(BIN)/geoseg

.venv-moto/bin/moto_server:
	PYTHON=$(PYTHON) bash tools/setup_s3_test_server.sh

demo: install
	$(BIN)/geoseg predict examples/Spain_7370579_S2Hand.tif --model dynamic-world --out out/demo --overwrite

test: install .venv-moto/bin/moto_server
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf out .pytest_cache
