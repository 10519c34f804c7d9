"""The CPU rehearsal of a paper config: config/paper/qwen3-8b.yaml run through
Snakemake and the real modules (hf backends, one CPU process per stage) on tiny
Qwen3 models whose output layer has Qwen3's width (151,936) and whose
responses all reach the paper's 4,096 tokens, with few sequences (2 prompts
per stage, 1 held-out problem); each stage's measured peak memory is checked
against the planner's prediction (within 30%).

Slow (generation of 4,096 tokens, one at a time, in several stages): run by
`make test-rehearsal` (LOPD_REHEARSAL=1), not by `make test`.
LOPD_REHEARSAL_TOKENS sets a shorter response length for a quick look.

Choices:
- The models' output layer is 151,936 wide; the tokenizer is the project's
  own small one (as Qwen3's 151,669-token tokenizer sits under its
  151,936-wide output layer): ids past the tokenizer decode to nothing. The
  memory of every stage depends on the output layer's width, not on the text.
- Responses reach their length for certain: the models carry
  `min_new_tokens` in their generation config (transformers then masks the
  end-of-sequence ids until that many tokens), so every sampler (hf backend,
  standard OPD, drift, lm-eval's hf model) runs to max_new_tokens.
- Evaluation (aime24 only, one problem, k = 1) samples at most 512 tokens:
  lm-eval's hf model is the slowest sampler here and runs once per model.
- top_p 1.0 everywhere: a nucleus over 151,936 ids is a sort per token,
  ~4x slower on CPU, for memory the size of one row of logits.
- Peak memory per stage: each process's own peak RSS (ru_maxrss, which the
  planner's per-rank figure is), written at exit by a sitecustomize hook the
  test puts on PYTHONPATH. Snakemake's benchmark max_rss is shown beside it
  but not used: it samples the sum over the job's process tree (shell, tee,
  launcher and the stage) every 0.5 s for 15 s and then every 30 s, so it
  misses short peaks of long jobs.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from transformers import AutoModelForCausalLM, Qwen3Config

from lightning_opd import build_tokenizer, task_data
from lightning_opd.modeling import load_tokenizer
from lightning_opd.plan import load_config, plan
from test_paper_shaped import hub_shaped_files
from test_pipeline import ENV, REPO, SNAKEMAKE, copy_repo, merge, write_yaml

pytestmark = pytest.mark.skipif(not os.environ.get("LOPD_REHEARSAL"),
                                reason="slow: `make test-rehearsal` (LOPD_REHEARSAL=1) runs it")

TOKENS = int(os.environ.get("LOPD_REHEARSAL_TOKENS", "4096"))
# lm-eval's hf model samples ~3x slower than the project's sampler; five models are evaluated; the
# paper's 32,768 evaluation tokens are out of reach anyway
EVAL_TOKENS = min(TOKENS, 512)
VOCAB = 151_936
TOLERANCE = 0.3
# the stages of the planner, and how the process that runs each is recognised (module, --label)
STAGES = {
    "sft_data[A]": ("generate", "A"),
    "sft": ("sft", None),
    "rollouts": ("generate", "sft-A"),
    "teacher_cache[A]": ("teacher_cache", None),
    "lightning_opd": ("lightning_opd", None),
    "standard_opd": ("standard_opd", None),
    "evaluate": ("evaluate", "student_base"),  # the students' layout; the teachers' is planned on its own
    "evaluate[teacher-A]": ("evaluate", "teacher-A"),
}
PEAK_HOOK = '''import atexit, json, os, resource, sys


def _write_peak():
    out = os.environ.get("LOPD_PEAK_DIR")
    if out:
        record = {"argv": sys.argv, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
        with open(os.path.join(out, f"{os.getpid()}.json"), "w") as handle:
            json.dump(record, handle)


atexit.register(_write_peak)
'''


def paper_shaped_model(tokenizer, seed: int, out: Path) -> Path:
    import torch

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=2 * TOKENS + 1024, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.generation_config.min_new_tokens = TOKENS
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def rehearsal_config(root: Path) -> dict:
    data = root / "data"
    task_data.main(["--out-dir", str(data), "--hparams",
                    json.dumps({"n_teacher": 60, "n_sft": 4, "n_opd": 4, "n_eval": 4})])
    build_tokenizer.main(["--task-files", str(data / "teacher.parquet"), "--out", str(root / "tokenizer")])
    tokenizer = load_tokenizer(root / "tokenizer")
    files = hub_shaped_files({"data": data}, root)
    sampling = {"max_new_tokens": TOKENS, "batch_size": 2, "top_p": 1.0}
    train = {"max_steps": 1, "epochs": 1, "batch_size": 2, "micro_batch_size": 2, "packing": True, "bf16": False,
             "fsdp": None, "save_steps": 100, "logging_steps": 1}
    local = merge(yaml.safe_load((REPO / "config/paper/qwen3-8b.yaml").read_text()), {
        "results_dir": str(root / "results"),
        "data": {"sft": {**files["sft"], "limit": 2}, "opd": {**files["opd"], "limit": 2}},
        "tokenizer": {"path": str(root / "tokenizer")},
        "teachers": {"A": {"path": str(paper_shaped_model(tokenizer, 1, root / "teacher-A"))}},
        "student_base": {"path": str(paper_shaped_model(tokenizer, 3, root / "student_base"))},
        "generation": {"backend": "hf"},
        "sft_data": {"sampling": sampling},
        "sft": {"train": train, "keep_unfinished": True},
        "rollouts": {"sampling": sampling},
        "teacher_cache": {"backend": "hf", "max_response_tokens": TOKENS},
        "lightning_opd": train,
        # one prompt's n = 2 samples per step
        # the paper samples with a colocated vLLM engine; the rehearsal's stages run on hf
        "standard_opd": {"sampling": {"n": 2, "max_new_tokens": TOKENS, "batch_size": 2, "top_p": 1.0},
                         "sampler": "hf", "sampler_options": {}},
        "opd_drift": {"n_prompts": 1, "max_new_tokens": TOKENS, "every_steps": 1},
        "eval": {"tasks": ["aime24"], "k": 1, "max_gen_toks": EVAL_TOKENS, "top_p": 1.0, "backend": "hf",
                 "batch_size": 1},
        "resources": {"default": {"gpus": 0, "cpus": 2, "mem_mb": 16000, "runtime": 600}},
    })
    local["data"]["eval"] = {"aime24": {**files["eval"]["aime24"], "seed": 0, "limit": 1}}
    for section in ("generation", "sft_data", "teacher_cache", "eval"):
        local[section]["backend_options"] = {}  # the paper's are vLLM's
        if section != "eval":
            local[section]["data_parallel"] = 1
    local["eval"]["teacher_backend_options"] = None
    return local


def measured_peaks(peak_dir: Path) -> dict[str, float]:
    """The largest peak RSS (GB) of the processes of each planned stage."""
    peaks: dict[str, float] = {}
    for path in peak_dir.glob("*.json"):
        record = json.loads(path.read_text())
        argv = record["argv"]
        module = Path(argv[0]).stem
        label = argv[argv.index("--label") + 1] if "--label" in argv else None
        for stage, (stage_module, stage_label) in STAGES.items():
            if module == stage_module and stage_label in (None, label):
                peaks[stage] = max(peaks.get(stage, 0.0), record["peak_rss_gb"])
    return peaks


def benchmark_max_rss(results: Path) -> dict[str, float]:
    """Snakemake's max_rss (GB) per planned stage: the largest over its jobs."""
    dirs = {"sft_data[A]": "sft_data", "teacher_cache[A]": "teacher_cache", "evaluate[teacher-A]": "evaluate"}
    out = {}
    for stage in STAGES:
        files = list((results / "benchmarks" / dirs.get(stage, stage)).rglob("*.tsv"))
        if files:
            out[stage] = max(pd.read_csv(f, sep="\t")["max_rss"].max() for f in files) * 2**20 / 1e9
    return out


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    config_file = write_yaml(root / "rehearsal.yaml", rehearsal_config(root))
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PEAK_HOOK)
    peak_dir = root / "peaks"
    peak_dir.mkdir()
    work = copy_repo(root / "repo")
    env = {**ENV, "LOPD_PEAK_DIR": str(peak_dir), "OMP_NUM_THREADS": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), ENV.get("PYTHONPATH")]))}
    result = subprocess.run([SNAKEMAKE, "--workflow-profile", "none", "--cores", "2", "--configfile",
                             str(config_file)], cwd=work, env=env, capture_output=True, text=True, timeout=7200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    config = load_config([config_file], REPO / "config/config.yaml")
    return root / "results/qwen3-8b", {p.stage: p for p in plan(config)}, measured_peaks(peak_dir)


def test_responses_reach_the_paper_length(rehearsal):
    import pyarrow.parquet as pq

    results, _, _ = rehearsal
    for artifact in ("sft_data/teacher-A.parquet", "rollouts/sft-A.parquet", "cache/sft-A_teacher-A.parquet"):
        lengths = [len(r) for r in pq.read_table(results / artifact, columns=["response_ids"]).column(0).to_pylist()]
        assert lengths == [TOKENS, TOKENS], artifact
    model = AutoModelForCausalLM.from_pretrained(results / "models/sft-A")
    assert model.get_output_embeddings().weight.shape[0] == VOCAB


def test_every_stage_peak_is_within_30_percent_of_the_plan(rehearsal):
    results, plans, peaks = rehearsal
    rss = benchmark_max_rss(results)
    lines = [f"rehearsal: {TOKENS}-token responses, output layer {VOCAB:,} wide, one CPU process per stage",
             "| stage | planned peak (GB) | measured peak RSS (GB) | planned / measured | Snakemake max_rss (GB) |",
             "|---|---|---|---|---|"]
    for stage in STAGES:
        planned = plans[stage].peak_gb
        lines.append(f"| {stage} | {planned:.2f} | {peaks[stage]:.2f} | {planned / peaks[stage]:.2f} "
                     f"| {rss.get(stage, float('nan')):.2f} |")
    print("\n" + "\n".join(lines))
    assert set(peaks) == set(STAGES), set(STAGES) - set(peaks)
    off = {stage: (round(plans[stage].peak_gb, 2), round(peaks[stage], 2)) for stage in STAGES
           if abs(plans[stage].peak_gb - peaks[stage]) > TOLERANCE * peaks[stage]}
    assert not off, f"planned vs measured peak (GB) off by more than {TOLERANCE:.0%}: {off}"
