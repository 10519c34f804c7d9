"""Built once per test session: a tiny world made with the pipeline's own modules
(task data, a tokenizer, two random tiny Qwen3 teachers, a student base, SFT
data from teacher A, pi_ref (a few SFT steps), its rollouts and teacher caches),
and one reduced run of the whole pipeline through Snakemake (tiny_run)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_opd import build_tokenizer, generate, sft, task_data, teacher_cache
from lightning_opd.hparams import ArchParams, SamplingParams
from lightning_opd.modeling import load_tokenizer, tiny_qwen3_config

REPO = Path(__file__).resolve().parents[1]
TINY_ARCH = ArchParams(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=256,
)  # vLLM on CPU needs head_dim >= 32


def random_model(tokenizer_dir: Path, out: Path, seed: int) -> Path:
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_qwen3_config(TINY_ARCH, tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# The test modules that use the session's tiny_run (checked at collection). `make test` runs the tests on
# two pytest-xdist workers, a module at a time (`--dist loadscope`, so that a module-scoped fixture is built
# once), and sends these modules to one worker together, so that the end-to-end run is made once.
TINY_RUN_MODULES = {f"tests/test_{name}.py" for name in ("code_inputs", "config", "html_report", "pipeline", "report")}


UNLISTED = pytest.StashKey[str]()


def module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unlisted = sorted({module_of(item.nodeid) for item in items if "tiny_run" in item.fixturenames} - TINY_RUN_MODULES)
    if not unlisted:
        return
    message = f"tests/conftest.py: add {unlisted} to TINY_RUN_MODULES: they use tiny_run"
    if not hasattr(config, "workerinput"):
        raise pytest.UsageError(message)
    for item in items:  # an xdist worker's usage error would not reach the user: these tests fail with it instead
        if module_of(item.nodeid) in unlisted:
            item.stash[UNLISTED] = message


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if UNLISTED in item.stash:
        pytest.fail(item.stash[UNLISTED], pytrace=False)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: pytest without it runs the tests in one process
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadscope":
        from xdist.scheduler import LoadScopeScheduling

        class ModuleScheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                module = module_of(nodeid)
                return "tiny_run" if module in TINY_RUN_MODULES else module

        return ModuleScheduling(config, log)
    return None


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    data = root / "data"
    task_data.main(
        ["--out-dir", str(data), "--hparams", json.dumps({"n_teacher": 60, "n_sft": 16, "n_opd": 12, "n_eval": 8})]
    )
    build_tokenizer.main(["--task-files", str(data / "teacher.parquet"), "--out", str(root / "tokenizer")])
    w = {"root": root, "data": data, "tokenizer": root / "tokenizer"}
    w["teacher_A"] = random_model(w["tokenizer"], root / "teacher-A", seed=1)
    w["teacher_B"] = random_model(w["tokenizer"], root / "teacher-B", seed=2)
    w["student_base"] = random_model(w["tokenizer"], root / "student_base", seed=3)
    sampling = SamplingParams(max_new_tokens=12, batch_size=16, seed=0)
    generate.sample(str(w["teacher_A"]), data / "sft.parquet", root / "sft_data-A.parquet", sampling, label="A")
    sft.main(
        [
            "--base",
            str(w["student_base"]),
            "--sft-data",
            str(root / "sft_data-A.parquet"),
            "--train",
            json.dumps({"max_steps": 2, "batch_size": 8, "save_steps": 100}),
            "--keep-unfinished",
            "--out",
            str(root / "sft-A"),
            "--checkpoint-root",
            str(root / "ckpt"),
        ]
    )
    w["sft_A"] = root / "sft-A"
    generate.sample(str(w["sft_A"]), data / "opd.parquet", root / "rollouts.parquet", sampling, label="sft-A")
    w["rollouts"] = root / "rollouts.parquet"
    for t in ("A", "B"):
        teacher_cache.build_cache(str(w[f"teacher_{t}"]), w["rollouts"], root / f"cache-{t}.parquet", label=t)
        w[f"cache_{t}"] = root / f"cache-{t}.parquet"
    teacher_cache.build_cache(str(w["teacher_A"]), w["rollouts"], root / "cache-A-top8.parquet", label="A", top_k=8)
    w["cache_A_top8"] = root / "cache-A-top8.parquet"
    return w


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """The reduced config (tests/configs/tiny.yaml) run end to end once per session, in a copy of
    the repository: the copy's path and the config arguments."""
    from test_pipeline import copy_repo, snakemake

    work = copy_repo(tmp_path_factory.mktemp("repo"), "tests/configs")
    config = ["--configfile", "tests/configs/tiny.yaml"]
    snakemake(*config, cwd=work)
    return work, config
