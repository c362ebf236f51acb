# Two commands: `make demo` and `make test`. Set-up is idempotent: a stamp keyed by the dependency files.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
# The exact tested versions (the CPU build of torch); the package itself asks only for ranges.
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
PYTEST_ARGS ?=

.PHONY: setup demo test test-all lint clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.stamp-*
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PIP) torch
	$(PIP) -e '.[dev,demo,nnunet]'
	@# nnunetv2 pulls torchvision (through timm) from PyPI, a build for CUDA torch that fails to import beside the
	@# CPU torch and so breaks lightning's import; nothing ahm or nnU-Net's U-Nets run needs it.
	$(BIN)/python -m pip uninstall --quiet --disable-pip-version-check -y torchvision
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/ahm demo --quick --out ahm-demo

# The CI suite: everything except the long fuzz campaigns (bounded by hypothesis profile "ci").
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-all: $(STAMP)
	AHM_FUZZ_PROFILE=long $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) ahm-demo
