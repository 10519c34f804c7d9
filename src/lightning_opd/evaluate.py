"""Stage 8: avg@k accuracy of a model on a held-out set through lm-eval.

The task file lives in this package (``lm_eval_tasks/``); this module points
it at the evaluation parquet and sets k and the sampling from the arguments.
Every one of the k samples per problem is checked with math-verify."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_opd.artifacts import TASK_SCHEMA, atomic_path, read_table, write_json
from lightning_opd.modeling import add_chat_template_argument, fill_template
from lightning_opd.provenance import describe_model, file_sha256
from lightning_opd.vllm_shutdown import shutdown_engine

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
DEFAULT_TASK = TASKS_DIR / "synth_arith" / "synth_arith.yaml"


class ProblemPrompt:
    """lm-eval's ``doc_to_text`` from the config's prompt_template: the user turn that every other stage
    sends (`modeling.prompt_ids`), so that the models are evaluated on the prompt they were trained on."""

    def __init__(self, template: str):
        fill_template(template, "")  # a template without {problem} is refused here
        self.template = template

    def __call__(self, doc: dict) -> str:
        return fill_template(self.template, doc["problem"])

    def __repr__(self) -> str:  # what lm-eval writes for it in its task config
        return f"prompt_template {self.template!r}"


def task_config(task_yaml: Path, eval_file: Path, k: int, temperature: float, top_p: float,
                max_gen_toks: int, prompt_template: str | None = None) -> dict:
    """The task of ``task_yaml`` on ``eval_file``; with ``prompt_template``, its prompt is the template's
    (else the task's own ``doc_to_text``)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(task_yaml)
    if prompt_template is not None:
        config["doc_to_text"] = ProblemPrompt(prompt_template)
    config["dataset_path"] = "parquet"
    config["dataset_kwargs"] = {"data_files": {"test": str(Path(eval_file).resolve())}}
    config["test_split"] = "test"
    config["repeats"] = k
    config["filter_list"] = [{"name": "all_samples", "filter": [{"function": "take_first_k", "k": k}]}]
    config["generation_kwargs"] = {**config.get("generation_kwargs", {}), "do_sample": temperature > 0,
                                   "temperature": temperature, "top_p": top_p, "max_gen_toks": max_gen_toks}
    return config


def chat_template_model_args(chat_template_kwargs: dict | None, think_end_token: str | int | None) -> dict:
    """lm-eval's model arguments that render the prompt as every other stage
    does (`modeling.prompt_ids`): ``enable_thinking`` as its own argument (the
    vllm model of lm-eval 0.4.13 drops it from ``chat_template_args``), the
    other template arguments as ``chat_template_args``, and ``think_end_token``,
    after which lm-eval reads the answer."""
    kwargs = dict(chat_template_kwargs or {})
    args: dict = {}
    if "enable_thinking" in kwargs:
        args["enable_thinking"] = kwargs.pop("enable_thinking")
        if args["enable_thinking"] and think_end_token is None:
            raise ValueError("chat_template_kwargs.enable_thinking is true but eval.think_end_token is not set: "
                             "lm-eval needs the token that ends the thinking (e.g. \"</think>\" for Qwen3)")
    if kwargs:
        args["chat_template_args"] = kwargs
    if think_end_token is not None:
        args["think_end_token"] = think_end_token
    return args


def lm_eval_model(backend: str, model: str, batch_size: int, seed: int, options: dict,
                  chat_template_kwargs: dict | None = None, think_end_token: str | int | None = None
                  ) -> tuple[str, dict]:
    from lightning_opd.hub import split_revision

    template = chat_template_model_args(chat_template_kwargs, think_end_token)
    model, revision = split_revision(model)
    pinned = {"revision": revision} if revision else {}
    if backend == "hf":
        from lightning_opd.modeling import pick_device

        return "hf", {"pretrained": model, "dtype": options.get("dtype", "float32"), "batch_size": batch_size,
                      "device": str(pick_device(options.get("device"))), **pinned, **template}
    if backend == "vllm":
        return "vllm", {"pretrained": model, "seed": seed, "batch_size": "auto", **pinned, **options, **template}
    raise ValueError(f"unknown evaluation backend {backend!r}; choose hf or vllm")


def close_engine(lm) -> None:
    """Shut down the vLLM engine of lm-eval's vllm model (one engine; data-parallel ones are ray
    actors that lm-eval ends itself) before the results are written, instead of at interpreter exit
    (see ``vllm_shutdown``)."""
    engine = getattr(lm, "model", None)
    if getattr(engine, "llm_engine", None) is not None:
        shutdown_engine(engine)


def evaluate(model: str, eval_file: Path, out: Path, k: int = 4, temperature: float = 0.6, top_p: float = 0.95,
             max_gen_toks: int = 128, backend: str = "hf", batch_size: int = 64, seed: int = 0, label: str = "",
             task_yaml: Path = DEFAULT_TASK, backend_options: dict | None = None,
             chat_template_kwargs: dict | None = None, think_end_token: str | int | None = None,
             prompt_template: str | None = None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    read_table(eval_file, TASK_SCHEMA)  # a clear error for a missing or malformed set, before lm-eval starts
    config = task_config(task_yaml, eval_file, k, temperature, top_p, max_gen_toks, prompt_template)
    model_type, model_args = lm_eval_model(backend, model, batch_size, seed, backend_options or {},
                                           chat_template_kwargs, think_end_token)
    # vllm's is built here, as simple_evaluate would, so that its engine can be shut down below;
    # hf's is built by simple_evaluate after it seeds, as ever (the same samples as before)
    lm = model_type
    if backend == "vllm":
        lm = lm_eval.api.registry.get_model(model_type).create_from_arg_obj(
            model_args, {"batch_size": None, "max_batch_size": None, "device": None})
    try:
        # the task comes whole as a config: indexing lm-eval's default tasks would cost ~12 s per job
        output = lm_eval.simple_evaluate(
            model=lm, model_args=model_args, tasks=[config], task_manager=TaskManager(include_defaults=False),
            apply_chat_template=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            log_samples=True, bootstrap_iters=0,
        )
    finally:
        close_engine(lm)
    task = config["task"]
    metrics = output["results"][task]
    samples = output["samples"][task]
    summary = {
        "label": label,
        "model": describe_model(model),
        "eval_file": {"path": str(eval_file), "sha256": file_sha256(eval_file)},
        "task": task,
        "k": k,
        "n_problems": len(samples),
        "avg_at_k": metrics["avg_at_k,all_samples"],
        "pass_at_k": metrics["pass_at_k,all_samples"],
        "sampling": {"temperature": temperature, "top_p": top_p, "max_gen_toks": max_gen_toks, "seed": seed},
        "backend": backend,
        "backend_options": backend_options or {},  # the engine layout: data-parallel replicas sample differently
        "chat_template_kwargs": chat_template_kwargs or {},
        "prompt_template": prompt_template,  # null: the task's own doc_to_text
        "think_end_token": think_end_token,
    }
    with atomic_path(out.with_suffix(".samples.jsonl")) as tmp:
        with open(tmp, "w") as handle:
            for s in samples:
                handle.write(json.dumps({"id": s["doc"].get("id"), "answer": s["target"],
                                         "responses": s["filtered_resps"][0], "avg_at_k": s["avg_at_k"]}) + "\n")
    write_json(out, summary)
    print(f"{label or model}: avg@{k} = {summary['avg_at_k']:.4f} over {summary['n_problems']} problems -> {out}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="hub id or local model directory")
    parser.add_argument("--eval-file", type=Path, required=True, help="parquet with problem and answer columns")
    parser.add_argument("--out", type=Path, required=True, help="summary JSON (samples go beside it)")
    parser.add_argument("--k", type=int, default=4, help="samples per problem (avg@k)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-gen-toks", type=int, default=128)
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="")
    parser.add_argument("--task-yaml", type=Path, default=DEFAULT_TASK)
    parser.add_argument("--prompt-template", help="the user turn, with {problem} (the pipeline's prompt_template); "
                                                  "default: the task's own doc_to_text")
    parser.add_argument("--backend-options", default="{}", help="JSON of extra lm-eval model_args")
    add_chat_template_argument(parser)
    parser.add_argument("--think-end-token", help="lm-eval's think_end_token (text, or a token id)")
    args = parser.parse_args(argv)
    evaluate(args.model, args.eval_file, args.out, args.k, args.temperature, args.top_p, args.max_gen_toks,
             args.backend, args.batch_size, args.seed, args.label, args.task_yaml, json.loads(args.backend_options),
             args.chat_template_kwargs, args.think_end_token, args.prompt_template)


if __name__ == "__main__":
    main()
