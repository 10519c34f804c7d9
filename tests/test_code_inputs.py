"""Each rule's code inputs are the package files its module imports: editing any file of the
package reruns exactly the rules whose commands import it, and what depends on their outputs.

The expectation is built without the workflow's own import scan (workflow/rules/common.smk):
which modules a rule runs is read from the commands a dry run prints, what those import from
Python's modulefinder (bytecode, imports inside functions included), and the jobs that depend
on a rule from the DAG Snakemake prints."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections import defaultdict
from modulefinder import ModuleFinder
from pathlib import Path

import pytest

from test_pipeline import REPO, planned_jobs, snakemake

SRC = REPO / "src"
PACKAGE_FILES = sorted(str(p.relative_to(REPO)) for p in (SRC / "lightning_opd").rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts)


class PackageFinder(ModuleFinder):
    """modulefinder that loads the modules of this package only; the names it does not load
    (third-party, standard library) end up in `badmodules`."""

    def __init__(self, src: Path = SRC):
        super().__init__(path=[str(src)])
        self.src = src

    def import_module(self, partname, fqname, parent):
        if fqname.split(".")[0] != "lightning_opd":
            return None
        return super().import_module(partname, fqname, parent)

    def package_files(self) -> set[str]:
        return {str(Path(m.__file__).relative_to(self.src.parent)) for m in self.modules.values() if m.__file__}

    def third_party(self) -> set[str]:
        names = {name.split(".")[0] for name in self.badmodules}
        return names - set(sys.stdlib_module_names) - {"lightning_opd"}


def command_code(command: str, src: Path = SRC) -> tuple[set[str], set[str]]:
    """The package files (relative to the repository) and the third-party modules that a command
    runs: the modules it starts (`python -m lightning_opd.x`, and the module the launcher
    starts), the package files it names (an lm-eval task yaml) and the modules such a yaml calls
    by `!function module.function` (a file beside it, or a module of the package)."""
    finder = PackageFinder(src)
    named = set()
    for module in re.findall(r"\blightning_opd\.([\w.]+)", command):
        finder.import_hook(f"lightning_opd.{module}")
    for name in re.findall(r"(\S*lightning_opd/\S+\.ya?ml)\b", command):
        path = Path(name) if os.path.isabs(name) else src.parent / name
        named.add(str(path.relative_to(src.parent)))
        for module in re.findall(r"!function\s+([\w.]+)\.\w+", path.read_text()):
            beside = path.parent.joinpath(*module.split(".")).with_suffix(".py")
            finder.run_script(str(beside if beside.is_file() else src.joinpath(*module.split(".")).with_suffix(".py")))
    return finder.package_files() | named, finder.third_party()


def rule_commands(dry_run_output: str) -> dict[str, list[str]]:
    """rule -> the shell commands of its jobs, from a `snakemake -n -p` output."""
    commands = defaultdict(list)
    for block in re.split(r"\n(?=rule \w+:)", dry_run_output):
        name = re.match(r"rule (\w+):", block)
        command = re.search(r"\nShell command: (.*?)(?:\n\n|\nJob stats:|$)", block, re.S)
        if name and command and command.group(1) != "None":  # None: a rule without shell:, such as `all`
            commands[name.group(1)].append(command.group(1).strip())
    return dict(commands)


def rule_code(dry_run_output: str, src: Path = SRC) -> dict[str, set[str]]:
    """rule -> the package files its jobs run."""
    return {rule: set().union(*(command_code(c, src)[0] for c in commands))
            for rule, commands in rule_commands(dry_run_output).items()}


def downstream_jobs(d3dag: dict, rules: set[str]) -> dict[str, int]:
    """The jobs of `rules` and every job that depends on one, counted per rule."""
    rule_of = {node["id"]: node["value"]["rule"] for node in d3dag["nodes"]}
    children = defaultdict(set)
    for link in d3dag["edges"]:  # u feeds v
        children[link["u"]].add(link["v"])
    todo = [job for job, rule in rule_of.items() if rule in rules]
    seen = set()
    while todo:
        if (job := todo.pop()) not in seen:
            seen.add(job)
            todo.extend(children[job])
    counts = defaultdict(int)
    for job in seen:
        counts[rule_of[job]] += 1
    return dict(counts)


@pytest.fixture(scope="module")
def finished_copy(tiny_run, tmp_path_factory):
    """A copy of the finished tiny run (outputs, Snakemake's records and all), its code per rule
    and its DAG."""
    work, config = tiny_run
    copy = tmp_path_factory.mktemp("edits") / "repo"
    shutil.copytree(work, copy, symlinks=True)  # keeps modification times
    assert planned_jobs(snakemake("-n", *config, cwd=copy).stdout) == {}
    printed = snakemake("-n", "-p", "--forceall", *config, cwd=copy).stdout
    d3dag = json.loads(snakemake("--d3dag", "--forceall", *config, cwd=copy).stdout)
    return copy, config, rule_code(printed, copy / "src"), d3dag


def test_every_stage_runs_package_code(finished_copy):
    _, _, code, _ = finished_copy
    stages = {"task_data", "tokenizer", "pretrain_teacher", "pretrain_student_base", "sft_data", "sft", "rollouts",
              "teacher_cache", "lightning_opd", "standard_opd", "evaluate", "report"}
    assert stages <= {rule for rule, files in code.items() if "src/lightning_opd/__init__.py" in files}, code
    # imports inside functions count: the backends choose hf or vllm when called
    assert "src/lightning_opd/backends/vllm.py" in code["rollouts"]
    assert "src/lightning_opd/launch.py" in code["sft"] and "src/lightning_opd/launch.py" not in code["evaluate"]
    assert "src/lightning_opd/lm_eval_tasks/answer_check.py" in code["evaluate"]


@pytest.mark.parametrize("edited", PACKAGE_FILES)
def test_editing_a_package_file_reruns_the_rules_that_run_it(finished_copy, edited):
    work, config, code, d3dag = finished_copy
    importers = {rule for rule, files in code.items() if edited in files}
    expected = downstream_jobs(d3dag, importers) if importers else {}
    path = work / edited
    original, stat = path.read_bytes(), path.stat()
    path.write_bytes(original + b"\n# an edit\n")
    try:
        planned = planned_jobs(snakemake("-n", *config, cwd=work).stdout)
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert planned == expected, f"{edited} is run by {sorted(importers) or 'no rule'}"
