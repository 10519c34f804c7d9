"""`prompt_template` and `chat_template_kwargs`: every stage that renders a
prompt renders the same token ids for the same problem (SFT data and
rollouts, standard OPD's live prompts, the drift prompts, and lm-eval as
`evaluate` runs it, whose task has a doc_to_text of its own), and the kwargs
reach the template (Qwen3's `enable_thinking` switch of the tiny tokenizer
changes the ids)."""
from __future__ import annotations

import pytest

from lightning_opd import evaluate, generate
from lightning_opd.artifacts import SAMPLES_SCHEMA, TASK_SCHEMA, read_table
from lightning_opd.hparams import SamplingParams
from lightning_opd.modeling import load_tokenizer, prompt_ids
from lightning_opd.opd_trainer import drift_reference
from lightning_opd.standard_opd import live_prompts

N_PROBLEMS = 3
THINK_END = "</think>"
TEMPLATE = "Q: {problem} Put the final answer in \\boxed{}."  # not the task's doc_to_text, "{{problem}}"


def lm_eval_prompt_ids(model, eval_file, chat_template_kwargs) -> list[list[int]]:
    """The prompt ids lm-eval generates from in `evaluate`: its model built from
    evaluate's model arguments, the task's requests rendered through the model's
    chat template (as simple_evaluate does), encoded as its generate_until does."""
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager, get_task_dict

    model_type, model_args = evaluate.lm_eval_model("hf", str(model), 8, 0, {}, chat_template_kwargs, THINK_END)
    lm = get_model(model_type).create_from_arg_obj(model_args)
    config = evaluate.task_config(evaluate.DEFAULT_TASK, eval_file, 1, 0.6, 0.95, 8, TEMPLATE)
    task = get_task_dict([config], TaskManager())[config["task"]]
    task.build_all_requests(limit=N_PROBLEMS, rank=0, world_size=1, apply_chat_template=True,
                            chat_template=lm.apply_chat_template, tokenizer_name=lm.tokenizer_name)
    contexts = [instance.args[0] for instance in sorted(task.instances, key=lambda i: i.doc_id)]
    return [lm.tok_batch_encode([context])[0][0].tolist() for context in contexts]


@pytest.fixture(scope="module")
def rendered(world, tmp_path_factory):
    """Prompt ids of the first problems of the eval set, per stage, for each setting of enable_thinking."""
    eval_file = world["data"] / "eval.parquet"
    tokenizer = load_tokenizer(world["teacher_A"])
    out = {}
    for thinking in (True, False):
        kwargs = {"enable_thinking": thinking}
        samples = tmp_path_factory.mktemp("samples") / "samples.parquet"
        generate.sample(str(world["teacher_A"]), eval_file, samples, SamplingParams(max_new_tokens=2, batch_size=8),
                        prompt_template=TEMPLATE, chat_template_kwargs=kwargs)
        table, meta = read_table(samples, SAMPLES_SCHEMA)
        _, drift_batches = drift_reference(str(world["teacher_A"]), tokenizer, eval_file, N_PROBLEMS,
                                           TEMPLATE, 2, rows_per_batch=N_PROBLEMS,
                                           chat_template_kwargs=kwargs)
        assert len(drift_batches) == 1  # one process, all rows in one batch
        out[thinking] = {
            "generate": table.column("prompt_ids").to_pylist()[:N_PROBLEMS],
            "generate_metadata": meta["chat_template_kwargs"],
            "standard_opd": live_prompts(tokenizer, eval_file, TEMPLATE, kwargs)[:N_PROBLEMS],
            "drift": drift_batches[0]["input_ids"].tolist(),
            "lm_eval": lm_eval_prompt_ids(world["teacher_A"], eval_file, kwargs),
        }
    return out


@pytest.mark.parametrize("thinking", [True, False])
def test_every_stage_renders_the_same_prompt_ids(rendered, thinking):
    stages = rendered[thinking]
    assert stages["generate_metadata"] == {"enable_thinking": thinking}
    expected = stages["generate"]
    assert len(expected) == N_PROBLEMS
    assert stages["standard_opd"] == expected
    assert stages["lm_eval"] == expected
    # the drift batch holds prompt + sampled response, right-padded
    assert [row[:len(prompt)] for row, prompt in zip(stages["drift"], expected)] == expected


def test_enable_thinking_reaches_the_template(rendered, world):
    thinking, plain = rendered[True]["generate"], rendered[False]["generate"]
    assert all(a != b for a, b in zip(thinking, plain))
    tokenizer = load_tokenizer(world["tokenizer"])
    assert tokenizer.decode(plain[0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    problem = read_table(world["data"] / "eval.parquet", TASK_SCHEMA)[0].column("problem")[0].as_py()
    assert thinking[0] == prompt_ids(tokenizer, problem, TEMPLATE)  # as Qwen3 renders it, thinking unless told


def test_thinking_without_a_think_end_token_is_refused():
    with pytest.raises(ValueError, match="eval.think_end_token"):
        evaluate.chat_template_model_args({"enable_thinking": True}, None)
    assert evaluate.chat_template_model_args({"enable_thinking": False, "x": 1}, None) == {
        "enable_thinking": False, "chat_template_args": {"x": 1}}
