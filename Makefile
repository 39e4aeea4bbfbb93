# sdrt: two commands on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of PyTorch for the exporter and the baselines; override for a CUDA machine.
TORCH  ?= torch==2.13.0

.PHONY: setup demo demo-train test test-slow bench-cpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,tensorrt-rtx]"
	# CLIP's real BPE vocabulary for single-file checkpoints: only the package's data file is read
	# (its dependencies would pull a CUDA build of torch)
	$(BIN)/pip install -q --no-deps "open-clip-torch==3.3.0"
	touch $@

# Exports the demo model (trained by `make demo-train`, shipped in demo/model) and draws a picture.
demo: setup
	rm -rf engines/demo
	$(BIN)/sdrt export demo/model -o engines/demo
	$(BIN)/sdrt generate engines/demo "a red circle on a white background" --steps 20 --seed 1 -o out/demo.png

# Retrains demo/model from scratch on this CPU (~23 min on 2 cores; seeded).
demo-train: setup
	rm -rf demo/model
	$(BIN)/sdrt train-demo demo/model

test: setup
	$(BIN)/python -m pytest

# Real-size checks (sd15, sdxl, sd35m test models): ~26 min on 2 cores, ~17 GB of RAM, ~45 GB of free disk.
test-slow: setup
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf models engines/tiny engines/demo out .pytest_cache
