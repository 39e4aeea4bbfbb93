# sdrt: two commands on a fresh machine — `make demo` and `make test`.
comma := ,
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# `make setup` installs exactly requirements.lock (every package the tests use, torch's CPU build
# included); `make lock` regenerates it from pyproject.toml's ranges with pip-tools.
LOCK   := requirements.lock
PIP    := pip==26.3
EXTRAS := test,tensorrt-rtx
# The CPU build of PyTorch (on this machine kind's disk) for the exporter and the baselines.
TORCH  ?= torch==2.13.0
# CLIP's real BPE vocabulary for single-file checkpoints: only the package's data file is read, so it
# is installed without its dependencies (they would pull a CUDA build of torch and torchvision).
OPEN_CLIP := open-clip-torch==3.3.0

.PHONY: setup lock demo demo-train test test-latest test-slow bench-cpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(LOCK) pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(PIP)"
	$(BIN)/pip install -q -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	$(BIN)/pip install -q --no-deps "$(OPEN_CLIP)"
	touch $@

# Resolves pyproject.toml's ranges (all extras the tests use) to exact versions.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q "$(PIP)" "pip-tools==7.6.2"
	echo "$(TORCH)" > .venv-lock/torch.in
	# sdrt is left out: the extras name sdrt itself, which would pin this checkout's path
	.venv-lock/bin/pip-compile --quiet --strip-extras --extra $(subst $(comma), --extra ,$(EXTRAS)) --unsafe-package sdrt --unsafe-package setuptools --unsafe-package pip \
		--no-emit-index-url --no-emit-find-links -o $(LOCK).tmp pyproject.toml .venv-lock/torch.in
	sed -i 's|\.venv-lock/torch\.in|the Makefile'"'"'s TORCH|; s|$(LOCK)\.tmp|$(LOCK)|' $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

# The newest versions pyproject.toml's ranges allow (torch stays the CPU build), in another venv:
# drift shows here before it reaches a newcomer's `make setup`.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install -q "$(PIP)"
	.venv-latest/bin/pip install -q --upgrade "$(TORCH)" -e ".[$(EXTRAS)]"
	.venv-latest/bin/pip install -q --no-deps "$(OPEN_CLIP)"
	# what drifted from the lock (names normalised: pip freeze writes some as their wheels do)
	grep -E '^[A-Za-z0-9]' $(LOCK) | tr 'A-Z_' 'a-z-' | sort > .venv-latest/locked.txt
	.venv-latest/bin/pip freeze --exclude-editable | tr 'A-Z_' 'a-z-' | sort > .venv-latest/latest.txt
	diff .venv-latest/locked.txt .venv-latest/latest.txt | grep '^[<>]' || true
	.venv-latest/bin/python -m pytest

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
