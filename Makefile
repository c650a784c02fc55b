# `make test` builds .venv (when missing or older than pyproject.toml), lints (ruff) and runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Machines of this project's CI kind cap pip at torch 2.14.1 (/etc/xdg/pip) and keep that CUDA build
# on disk; PyPI's CPU-only torch cannot import torchvision there. Elsewhere the resolver picks.
TORCH_PIN := $(shell test -f /etc/xdg/pip/constraints.txt && echo "torch==2.14.1 torchvision==0.29.1")

.PHONY: test test-fast test-slow test-spark lint demo demo-s3 venv clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_PIN),$(PY) -m pip install --quiet $(TORCH_PIN))
	$(PY) -m pip install --quiet -e '.[dev]' $(TORCH_PIN)
	touch $@

lint: venv
	$(VENV)/bin/ruff check .

# PYTHONFAULTHANDLER: a crash in native code, at exit too (seen once after a passing suite), prints where it was.
test: venv lint
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -m "not spark and not slow" $(PYTEST_ARGS)

# The scenarios of half a minute or more on a Ray of their own (Ray clusters, the GPU check's rehearsal, a full disk,
# a deleted bucket, the drift drill, the demo's review loop; ~13 minutes on 2 cores): out of `make test` to keep it under 15 minutes; CI (.ci/run) runs both.
test-slow: venv
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -m slow $(PYTEST_ARGS)

# The inner loop (a few minutes): lint and every test that runs no Ray job. CI runs `make test` and `make test-slow`.
test-fast: venv lint
	$(PY) -m pytest -m "not spark and not ray_job" $(PYTEST_ARGS)

# docs/queries.md's Spark SQL forms run by Spark against DuckDB's answers: pyspark (the 'spark' extra) and Java 17.
test-spark: venv
	$(PY) -m pip install --quiet -e '.[dev,spark]' $(TORCH_PIN)
	$(PY) -m pytest -m spark tests/test_engines.py $(PYTEST_ARGS)

# The whole product on this machine: synthesize -> train -> label -> query (local files, then S3 on loopback).
demo: venv
	RAY_AUTH_MODE=disabled $(PY) jobs/demo.py --workdir demo-out

demo-s3: venv
	RAY_AUTH_MODE=disabled $(PY) jobs/demo.py --workdir demo-out-s3 --s3

clean-venv:
	rm -rf $(VENV)
