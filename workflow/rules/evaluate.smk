# Stage 8: avg@k through lm-eval for every model of the experiment.
from snakemake.exceptions import WorkflowError

# `eval.task`: a task of src/lightning_opd/lm_eval_tasks/ by name, or a path to a task yaml.
EVAL_TASK_NAME = config["eval"]["task"]
EVAL_TASK = (Path(EVAL_TASK_NAME) if EVAL_TASK_NAME.endswith((".yaml", ".yml"))
             else PKG / "lm_eval_tasks" / EVAL_TASK_NAME / f"{EVAL_TASK_NAME}.yaml")
if not EVAL_TASK.is_file():
    raise WorkflowError(f"eval.task {EVAL_TASK_NAME!r}: {EVAL_TASK} not found (give a task of "
                        f"{PKG / 'lm_eval_tasks'} by name, or a path to a task yaml)")


rule evaluate:
    input:
        model=lambda w: built(eval_model_path(w.model)),
        eval_file=f"{R}/data/eval.parquet",
        task=os.path.relpath(EVAL_TASK),
        task_code=task_code(EVAL_TASK),
        code=code_inputs("evaluate"),
    output:
        summary=f"{R}/eval/{{model}}.json",
        samples=f"{R}/eval/{{model}}.samples.jsonl",
    params:
        cmd=command("evaluate"),
        model=lambda w: eval_model_path(w.model),
        k=config["eval"]["k"],
        temperature=config["eval"]["temperature"],
        top_p=config["eval"]["top_p"],
        max_gen_toks=config["eval"]["max_gen_toks"],
        backend=config["eval"]["backend"],
        batch_size=config["eval"]["batch_size"],
        seed=config["eval"]["seed"],
        backend_options=js(config["eval"]["backend_options"]),
        chat_template=js(config["chat_template_kwargs"]),
        think_end=(["--think-end-token", str(config["eval"]["think_end_token"])]
                   if config["eval"].get("think_end_token") is not None else []),
    log:
        logfile("evaluate", "{model}"),
    benchmark:
        bench("evaluate", "{model}")
    threads: rule_threads("evaluate")
    resources:
        **rule_resources("evaluate"),
    conda:
        "../envs/eval.yaml"
    shell:
        "{params.cmd} --model {params.model:q} --eval-file {input.eval_file:q} "
        "--out {output.summary:q} --k {params.k:q} --temperature {params.temperature:q} --top-p {params.top_p:q} "
        "--max-gen-toks {params.max_gen_toks:q} --backend {params.backend:q} --batch-size {params.batch_size:q} "
        "--seed {params.seed:q} --label {wildcards.model:q} --task-yaml {input.task:q} "
        "--backend-options {params.backend_options} --chat-template-kwargs {params.chat_template} {params.think_end:q} "
        "2>&1 | tee {log:q}"
