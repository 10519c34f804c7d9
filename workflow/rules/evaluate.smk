# Stage 8: avg@k through lm-eval for every benchmark of `eval.tasks` and every model of the experiment.
from snakemake.exceptions import WorkflowError

for task, task_yaml in zip(config["eval"]["tasks"], BENCHMARKS.values()):
    if not task_yaml.is_file():
        raise WorkflowError(f"eval.tasks: {task!r}: {task_yaml} not found (give a task of "
                            f"{PKG / 'lm_eval_tasks'} by name, or a path to a task yaml)")
if len(BENCHMARKS) != len(config["eval"]["tasks"]):
    raise WorkflowError(f"eval.tasks {config['eval']['tasks']}: two tasks share a name (a task yaml's file stem "
                        "names its benchmark)")
if "data" in config and set(config["data"]["eval"]) != set(BENCHMARKS):
    raise WorkflowError(f"data.eval has datasets for {sorted(config['data']['eval'])} but eval.tasks names the "
                        f"benchmarks {list(BENCHMARKS)}: give data.eval one dataset per benchmark, by its name")


def eval_task_code(benchmark):
    """The Python beside a task file and the shared checker: inputs, so that an edit reruns the evaluation."""
    return sorted({os.path.relpath(p) for p in [*BENCHMARKS[benchmark].parent.glob("*.py"),
                                                PKG / "lm_eval_tasks/answer_check.py"]})


rule evaluate:
    input:
        model=lambda w: built(eval_model_path(w.model)),
        eval_file=lambda w: eval_data(w.benchmark),
        task=lambda w: os.path.relpath(BENCHMARKS[w.benchmark]),
        task_code=lambda w: eval_task_code(w.benchmark),
        code=code("evaluate.py"),
    output:
        summary=f"{R}/eval/{{benchmark}}/{{model}}.json",
        samples=f"{R}/eval/{{benchmark}}/{{model}}.samples.jsonl",
    params:
        model=lambda w: eval_model_path(w.model),
        k=config["eval"]["k"],
        temperature=config["eval"]["temperature"],
        top_p=config["eval"]["top_p"],
        max_gen_toks=config["eval"]["max_gen_toks"],
        backend=config["eval"]["backend"],
        batch_size=config["eval"]["batch_size"],
        seed=config["eval"]["seed"],
        backend_options=js(config["eval"]["backend_options"]),
    log:
        logfile("evaluate", "{benchmark}/{model}"),
    benchmark:
        bench("evaluate", "{benchmark}/{model}")
    threads: res("evaluate")["cpus"]
    resources:
        **stage_resources("evaluate"),
    conda:
        "../envs/eval.yaml"
    shell:
        "python -m lightning_opd.evaluate --model {params.model} --eval-file {input.eval_file} "
        "--out {output.summary} --k {params.k} --temperature {params.temperature} --top-p {params.top_p} "
        "--max-gen-toks {params.max_gen_toks} --backend {params.backend} --batch-size {params.batch_size} "
        "--seed {params.seed} --label {wildcards.model} --task-yaml {input.task} "
        "--backend-options {params.backend_options} 2>&1 | tee {log}"
