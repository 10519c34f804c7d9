# Quick start: `make run` (the default experiment end to end) and `make test`.
# Both create the virtual environment first if it is missing or stale.
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch; on a GPU machine set TORCH to the CUDA build you want.
TORCH ?= torch==2.13.0
CORES ?= all
STAMP := $(VENV)/.installed

.PHONY: run test env dry-run clean

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

clean:
	rm -rf results .snakemake
