# `make test` and `make demo` bootstrap .venv on first use. torch/torchvision are pinned here
# (this machine installs exactly these from local disk); the package itself declares ranges.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: venv test test-all demo clean

$(VENV)/.installed: setup.py
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

demo: venv
	$(VPY) tools/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
