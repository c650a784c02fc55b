# `make test` builds .venv (when missing or older than pyproject.toml) and runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Machines of this project's CI kind cap pip at torch 2.14.1 (/etc/xdg/pip) and keep that CUDA build
# on disk; PyPI's CPU-only torch cannot import torchvision there. Elsewhere the resolver picks.
TORCH_PIN := $(shell test -f /etc/xdg/pip/constraints.txt && echo "torch==2.14.1 torchvision==0.29.1")

.PHONY: test venv clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_PIN),$(PY) -m pip install --quiet $(TORCH_PIN))
	$(PY) -m pip install --quiet -e '.[dev]' $(TORCH_PIN)
	touch $@

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
