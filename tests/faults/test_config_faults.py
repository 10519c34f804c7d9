"""The rule layer under hostile or inconsistent configs (Snakemake dry runs),
quoting of every shell line, and two Snakemake runs at once."""
from __future__ import annotations

import re
import shlex
import subprocess
import time

import pytest
from inject import assert_refused

from test_pipeline import ENV, REPO, SNAKEMAKE, copy_repo, planned_jobs, snakemake, write_yaml


def dry_run(tmp_path, override: dict, *args: str) -> subprocess.CompletedProcess:
    config = write_yaml(tmp_path / "override.yaml", {"results_dir": str(tmp_path / "results"), **override})
    return snakemake("-n", "--configfile", str(config), *args, check=False)


SAFE = "without whitespace"
HOSTILE = {
    "results_dir": (lambda pwned: {"results_dir": f"$(touch {pwned})"}, "['results_dir']", SAFE),
    "experiment": (lambda pwned: {"experiment": f"x;touch {pwned}"}, "['experiment']", "use only letters"),
    "teacher-path": (lambda pwned: {"teachers": {"A": {"path": f"`touch {pwned}`"}}}, "['teachers']['A']['path']",
                     SAFE),
    "tokenizer-path-newline": (lambda pwned: {"tokenizer": {"path": f"models/tok\ntouch {pwned}"}},
                               "['tokenizer']['path']", SAFE),
    "teacher-name": (lambda pwned: {"teachers": {f"A$(touch {pwned})": {"path": "/models/x"}}}, "['teachers']",
                     "use only letters and digits"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_config_string_is_refused_and_never_run(tmp_path, case):
    make, key, advice = HOSTILE[case]
    pwned = tmp_path / "pwned"
    result = dry_run(tmp_path, make(pwned))
    assert_refused(result, key, advice)
    assert not pwned.exists(), "a config value ran as a command"
    assert not (tmp_path / "results").exists()
    fixed = dry_run(tmp_path, {})
    assert fixed.returncode == 0, fixed.stderr[-2000:]


def test_prompt_template_reaches_the_module_as_one_literal_argument(tmp_path):
    pwned = tmp_path / "pwned"
    template = f"Solve $(touch {pwned}) `id`; {{problem}} and put the answer in \\boxed{{}}. It's \"quoted\"."
    result = dry_run(tmp_path, {"prompt_template": template}, "-p")
    assert result.returncode == 0, result.stderr[-2000:]
    commands = [line for line in result.stdout.splitlines() if "--prompt-template" in line]
    # SFT data, rollouts, standard OPD, the 1 + 3 later rounds of rounds2 and rounds4, and the 9 evaluations
    assert len(commands) == 16
    for line in commands:
        words = shlex.split(line.split("Shell command:", 1)[-1])
        assert words[words.index("--prompt-template") + 1] == template
    assert not pwned.exists()


def test_prompt_template_without_placeholder_is_refused(tmp_path):
    result = dry_run(tmp_path, {"prompt_template": "Solve it and put the answer in \\boxed{}."})
    assert_refused(result, "['prompt_template']", "{problem}")
    assert dry_run(tmp_path, {"prompt_template": "Solve {problem} in \\boxed{}."}).returncode == 0


def test_undefined_teacher_in_runs_is_refused_before_any_job(tmp_path):
    report = tmp_path / "results" / "default" / "report" / "table.md"
    report.parent.mkdir(parents=True)
    report.write_text("an earlier report\n")
    runs = {"sft_teachers": ["A"], "opd_teachers": ["C"], "seeds": [0]}
    result = dry_run(tmp_path, {"runs": runs})
    assert_refused(result, "runs.opd_teachers", "['C'] are not defined under `teachers`")
    assert "Building DAG" not in result.stdout + result.stderr
    assert report.read_text() == "an earlier report\n"
    assert dry_run(tmp_path, {"runs": {**runs, "opd_teachers": ["A"]}}).returncode == 0


def test_opd_teacher_that_can_never_run_is_refused(tmp_path):
    override = {"teachers": {"B": {"path": str(tmp_path)}},
                "runs": {"sft_teachers": ["A"], "opd_teachers": ["A", "B"], "seeds": [0]}}
    result = dry_run(tmp_path, override)
    assert_refused(result, "runs.opd_teachers", "['B'] never run", "allow_teacher_mismatch")
    fixed = dry_run(tmp_path, {**override, "allow_teacher_mismatch": True})
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    # A/A and A/B; the default's variants (topk4, topk16, 2 + 4 rounds: 8 trainings) for A/A alone
    assert planned_jobs(fixed.stdout)["lightning_opd"] == 2 + 8


def test_skipped_inconsistent_pairs_are_reported(tmp_path):
    override = {"teachers": {"B": {"path": str(tmp_path)}},
                "runs": {"sft_teachers": ["A", "B"], "opd_teachers": ["A", "B"], "seeds": [0]}}
    result = dry_run(tmp_path, override)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pairs ['A/B', 'B/A'] are skipped" in result.stdout + result.stderr
    assert planned_jobs(result.stdout)["lightning_opd"] == 2 * (1 + 8)  # A/A and B/B, each with the variants


JSON_PARAMS = re.compile(r"^\s*(\w+)=(?:lambda w[^:]*: )?(?:js\(|opd_params|command\(|tracking\()", re.MULTILINE)


def test_every_shell_value_is_quoted_once():
    """Paths, config values and wildcards go through `:q`; JSON params are quoted by js() and not again."""
    for rules in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = rules.read_text()
        pre_quoted = set(JSON_PARAMS.findall(text))
        for shell in re.findall(r"shell:\s*\n((?:\s*\".*\"\s*\n)+)", text):
            for placeholder in re.findall(r"\{([^{}]+)\}", shell):
                name, _, fmt = placeholder.partition(":")
                param = name.removeprefix("params.")
                if name.startswith("params.") and param in pre_quoted:
                    assert fmt != "q", f"{rules.name}: {{{placeholder}}} is quoted twice (js() already quotes)"
                else:
                    assert fmt == "q", f"{rules.name}: {{{placeholder}}} reaches the shell unquoted"


def test_a_second_snakemake_run_at_once_is_refused(tmp_path):
    work = copy_repo(tmp_path / "repo")
    arch = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 16}
    config = write_yaml(tmp_path / "tiny.yaml", {
        "task": {"n_teacher": 40, "n_sft": 4, "n_opd": 4, "n_eval": 4},
        "student_base": {"build": {"corpus": "raw_solutions", "arch": arch,
                                   "train": {"max_steps": 8, "batch_size": 8, "save_steps": 100}}}})
    target = "results/default/models/student_base"  # three jobs: long enough for a second run to meet the lock
    command = [SNAKEMAKE, target, "--workflow-profile", "none", "--cores", "1", "--configfile", str(config)]
    first = subprocess.Popen(command, cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not any((work / ".snakemake" / "locks").glob("*")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second could start"
    second = subprocess.run(command, cwd=work, env=ENV, capture_output=True, text=True, timeout=120)
    # Snakemake builds the DAG before it takes the lock: once the first run has started a job, the
    # second one stops earlier, at that job's output marked incomplete; either way it is refused
    text = second.stdout + second.stderr
    if "IncompleteFilesException" in text:
        assert_refused(second, "results/default/models/", "rerun your command with the --rerun-incomplete flag")
    else:
        assert_refused(second, "Directory cannot be locked", str(work))
    first.communicate(timeout=300)
    assert first.returncode == 0 and (work / target / "model.safetensors").is_file()
    again = subprocess.run(command, cwd=work, env=ENV, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
