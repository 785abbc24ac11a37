# Two commands from a fresh clone: `make run` (the nightly job on the embedded default) and `make test`.
# Each installs what it needs first; the install re-runs only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# llama-cpp-python builds from source once (~5-11 min on 2 cores); pip's wheel cache makes later installs take seconds.
PIP_FLAGS ?= --disable-pip-version-check

.PHONY: setup run test clean-state

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -q --upgrade pip wheel setuptools
	$(PY) -m pip install $(PIP_FLAGS) -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/orchard run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean-state:
	rm -rf .orchard
