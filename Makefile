# Two commands: `make demo` and `make test`. Set-up is idempotent: a stamp keyed by the dependency files.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
# The exact tested versions (the CPU build of torch); the package itself asks only for ranges.
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow test-all lint typecheck check-wheel clean

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

# The test suite, less the slow tests (DDP and torchrun, asynchronous agent workers, nnU-Net end to end, the
# example): under 15 minutes on 2 cores. CI runs the slow ones too (test-slow), then lint, types and the wheel.
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow $(PYTEST_ARGS)

# Everything, with the long fuzz campaigns (hypothesis profile "long").
test-all: $(STAMP)
	AHM_FUZZ_PROFILE=long $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests examples scripts

# mypy on src/ against mypy-baseline.txt: no new errors (the baseline may only shrink).
typecheck: $(STAMP)
	$(BIN)/python scripts/typecheck.py

# The wheel installs in a fresh venv with the tested versions and runs the command and the example.
check-wheel: $(STAMP)
	rm -rf build/check-wheel && mkdir -p build/check-wheel
	$(BIN)/python -m build --wheel --outdir build/check-wheel . > build/check-wheel/build.log
	$(PYTHON) -m venv build/check-wheel/venv
	build/check-wheel/venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch
	build/check-wheel/venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt \
	  "$$(ls build/check-wheel/ahm-*.whl)[demo]"
	cd build/check-wheel && venv/bin/ahm --help > /dev/null && \
	  venv/bin/python -c "import ahm; print('installed ahm', ahm.__version__)" && \
	  venv/bin/python ../../examples/quickstart.py --out example --tiny

clean:
	rm -rf $(VENV) ahm-demo build
