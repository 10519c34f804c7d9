# Stage 8: avg@k through lm-eval for every benchmark of `eval.tasks` and every model of the experiment.


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
