# Two commands from a fresh clone: `make run` (the nightly job on the embedded default) and `make test`.
# Each installs what it needs first; the install re-runs only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# llama-cpp-python builds from source once (~5-11 min on 2 cores); pip's wheel cache makes later installs take seconds.
PIP_FLAGS ?= --disable-pip-version-check

# Code answers run in a bubblewrap sandbox with the system python3 (Debian packages, not pip): installed
# only when missing; as root here and in CI, through sudo otherwise.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup sandbox run test clean-state

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -q --upgrade pip wheel setuptools
	$(PY) -m pip install $(PIP_FLAGS) -e ".[test]"
	touch $(STAMP)

sandbox:
	@command -v bwrap >/dev/null && test -x /usr/bin/python3 || { \
	  echo "installing bubblewrap and python3 (the code sandbox)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap python3 >/dev/null; }

setup: $(STAMP) sandbox

run: $(STAMP) sandbox
	$(VENV)/bin/orchard run $(ARGS)

test: $(STAMP) sandbox
	$(PY) -m pytest $(PYTEST_ARGS)

clean-state:
	rm -rf .orchard
