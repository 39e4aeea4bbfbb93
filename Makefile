# sdrt: two commands on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of PyTorch for the exporter and the baselines; override for a CUDA machine.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test test-slow bench-cpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,tensorrt-rtx]"
	touch $@

# Builds the tiny random-weight model, exports it, generates an image and prints the timing table.
demo: setup
	rm -rf models/tiny engines/tiny
	$(BIN)/sdrt testmodel tiny models/tiny
	$(BIN)/sdrt export models/tiny -o engines/tiny
	$(BIN)/sdrt generate engines/tiny "a photograph of an astronaut riding a horse" --steps 20 --seed 1 -o out/demo.png

test: setup
	$(BIN)/python -m pytest

# Real-size (sd15) checks: several minutes and ~12 GB of RAM.
test-slow: setup
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf models engines/tiny out .pytest_cache
