# `make test`, `make lint` and `make demo` bootstrap .venv on first use: ltdet installed editable
# with its dev extras, so tools/*.py import the installed package. torch/torchvision are pinned
# here (this machine installs exactly these from local disk); the package itself declares ranges.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: venv test test-all lint wheel-smoke demo clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet $(TORCH_PIN)
	$(VPY) -m pip install --quiet -e '.[dev]' $(TORCH_PIN)
	touch $@

venv: $(VENV)/.installed

test: venv
	$(VPY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: venv
	$(VPY) -m pytest -q $(PYTEST_ARGS)

# ruff (lint, then the format check) over the repository, mypy on the package; settings in
# pyproject.toml. All three run and report; the target fails if any of them failed.
lint: venv
	@status=0; \
	$(VENV)/bin/ruff check . || status=1; \
	$(VENV)/bin/ruff format --check . || status=1; \
	$(VENV)/bin/mypy || status=1; \
	exit $$status

# the wheel, installed without -e in a fresh venv, run from outside the repository
wheel-smoke: venv
	PY=$(VPY) TORCH_PIN="$(TORCH_PIN)" .ci/wheel_smoke.sh

demo: venv
	$(VPY) tools/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
