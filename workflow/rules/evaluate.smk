# Stage 8: avg@k through lm-eval for every benchmark of `eval.tasks` and every model of the experiment.


rule evaluate:
    input:
        model=lambda w: built(eval_model_path(w.model)),
        eval_file=lambda w: eval_data(w.benchmark),
        task=lambda w: os.path.relpath(BENCHMARKS[w.benchmark]),
        task_code=lambda w: eval_task_code(w.benchmark),
        code=code_inputs("evaluate"),
    output:
        summary=f"{R}/eval/{{benchmark}}/{{model}}.json",
        samples=f"{R}/eval/{{benchmark}}/{{model}}.samples.jsonl",
    log:
        logfile("evaluate", "{benchmark}/{model}"),
    benchmark:
        bench("evaluate", "{benchmark}/{model}")
    conda:
        "../envs/eval.yaml"
    threads: rule_threads("evaluate")
    resources:
        **rule_resources("evaluate"),
    params:
        cmd=command("evaluate", "{benchmark}/{model}"),
        model=lambda w: eval_model_path(w.model),
        k=config["eval"]["k"],
        temperature=config["eval"]["temperature"],
        top_p=config["eval"]["top_p"],
        max_gen_toks=config["eval"]["max_gen_toks"],
        backend=config["eval"]["backend"],
        batch_size=config["eval"]["batch_size"],
        seed=config["eval"]["seed"],
        backend_options=lambda w: js(eval_backend_options(w.model)),
        chat_template=js(config["chat_template_kwargs"]),
        template=lambda w: config["prompt_template"],  # the prompt the models were trained on
        think_end=(
            ["--think-end-token", str(config["eval"]["think_end_token"])]
            if config["eval"].get("think_end_token") is not None
            else []
        ),
    shell:
        "{params.cmd} --model {params.model:q} --eval-file {input.eval_file:q} "
        "--out {output.summary:q} --k {params.k:q} --temperature {params.temperature:q} --top-p {params.top_p:q} "
        "--max-gen-toks {params.max_gen_toks:q} --backend {params.backend:q} --batch-size {params.batch_size:q} "
        "--seed {params.seed:q} --label {wildcards.model:q} --task-yaml {input.task:q} "
        "--backend-options {params.backend_options} --chat-template-kwargs {params.chat_template} "
        "--prompt-template {params.template:q} {params.think_end:q} "
        "2>&1 | tee {log:q}"
