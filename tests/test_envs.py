"""The conda envs of workflow/envs/ are complete for the rules that use them: every
third-party package that the modules a rule runs import (directly, also
inside functions, through the package's own modules) is listed in that
rule's env. `--sdm conda` itself cannot run here (no conda channel is
reachable), so this is checked from the code."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "src/lightning_opd"
# importable names whose distribution is not installed in the test environment
KNOWN_DISTRIBUTIONS = {"vllm": "vllm"}
# imported only when the config chooses the vllm backend; the env that runs that backend lists it
OPTIONAL = {"vllm"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def env_packages(env: str) -> set[str]:
    spec = yaml.safe_load((REPO / "workflow/envs" / f"{env}.yaml").read_text())
    names = set()
    for dep in spec["dependencies"]:
        for item in dep["pip"] if isinstance(dep, dict) else [dep]:
            names.add(normalise(re.split(r"[<>=!~ ]", item, maxsplit=1)[0]))
    return names


def module_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """Top-level third-party names imported by a module of the package and the package modules it imports."""
    seen = set() if seen is None else seen
    if module in seen:
        return set()
    seen.add(module)
    path = PKG / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = PKG / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for name in names:
            if name.startswith("lightning_opd."):
                found |= module_imports(name.removeprefix("lightning_opd."), seen)
            elif name.split(".")[0] not in sys.stdlib_module_names and name != "lightning_opd":
                found.add(name.split(".")[0])
    return found


def distribution(import_name: str) -> str:
    dists = importlib.metadata.packages_distributions().get(import_name) or [KNOWN_DISTRIBUTIONS[import_name]]
    return normalise(dists[0])


def rules_envs_modules() -> list[tuple[str, str, set[str]]]:
    out = []
    for smk in sorted((REPO / "workflow/rules").glob("*.smk")):
        for name, body in re.findall(r"^ *rule (\w+):\n(.*?)(?=^ *rule \w+:|\Z)", smk.read_text(), re.S | re.M):
            env = re.search(r'"\.\./envs/(\w+)\.yaml"', body)
            modules = set(re.findall(r"lightning_opd\.(\w+)", body.split("shell:")[-1]))
            if env and modules:
                out.append((name, env.group(1), modules))
    return out


def test_every_rule_with_a_module_has_an_env():
    rules = {name for name, _, _ in rules_envs_modules()}
    assert {"sft_data", "sft", "rollouts", "teacher_cache", "lightning_opd", "standard_opd", "evaluate",
            "report", "tokenizer"} <= rules, rules


@pytest.mark.parametrize("rule, env, modules", rules_envs_modules(), ids=lambda x: x if isinstance(x, str) else "")
def test_env_lists_what_the_rule_imports(rule, env, modules):
    needed = {distribution(name) for module in modules for name in module_imports(module)}
    listed = env_packages(env)
    missing = sorted(d for d in needed - listed if d not in OPTIONAL)
    assert not missing, f"rule {rule} runs {sorted(modules)} with workflow/envs/{env}.yaml, which lacks {missing}"


def test_the_vllm_backend_env_has_vllm():
    # the rules that can run with `backend: vllm`: generation, scoring, evaluation
    assert "vllm" in env_packages("gen") and "vllm" in env_packages("eval")
