# Stage 1 (task data: the synthetic task, or real datasets when the config
# has a `data` section) and stage 2a (tokenizer).

if "data" in config:

    rule prepare_data:
        input:
            local=lambda w: [p for p in [config["data"][w.split]["source"]] if os.path.isfile(p)],
            code=code("prepare_data.py"),
        output:
            f"{R}/data/{{split}}.parquet",
        wildcard_constraints:
            split="sft|opd|eval",
        params:
            source=lambda w: config["data"][w.split]["source"],
            hf_split=lambda w: config["data"][w.split].get("split", "train"),
            problem=lambda w: config["data"][w.split]["problem_field"],
            answer=lambda w: (["--answer-field", config["data"][w.split]["answer_field"]]
                              if config["data"][w.split].get("answer_field") else []),
            limit=lambda w: ["--limit", config["data"][w.split]["limit"]] if config["data"][w.split].get("limit") else [],
        log:
            logfile("prepare_data", "{split}"),
        benchmark:
            bench("prepare_data", "{split}")
        threads: res("light")["cpus"]
        resources:
            **stage_resources("light"),
        conda:
            "../envs/train.yaml"
        shell:
            "python -m lightning_opd.prepare_data --source {params.source:q} --split {params.hf_split:q} "
            "--problem-field {params.problem:q} {params.answer:q} {params.limit:q} --name {wildcards.split:q} "
            "--out {output:q} > {log:q} 2>&1"


else:

    rule task_data:
        input:
            code=code("task_data.py", "task.py"),
        output:
            expand("{R}/data/{split}.parquet", R=R, split=["teacher", "sft", "opd", "eval"]),
        params:
            task=js(config["task"]),
            out_dir=lambda w, output: os.path.dirname(output[0]),
        log:
            logfile("task_data"),
        benchmark:
            bench("task_data")
        threads: res("light")["cpus"]
        resources:
            **stage_resources("light"),
        conda:
            "../envs/gen.yaml"
        shell:
            "python -m lightning_opd.task_data --out-dir {params.out_dir:q} --hparams {params.task} > {log:q} 2>&1"


rule tokenizer:
    input:
        task=f"{R}/data/teacher.parquet",
        code=code("build_tokenizer.py", "task.py"),
    output:
        directory(f"{R}/models/tokenizer"),
    params:
        vocab_size=lambda w: config["tokenizer"]["build"]["vocab_size"],
    log:
        logfile("tokenizer"),
    benchmark:
        bench("tokenizer")
    threads: res("light")["cpus"]
    resources:
        **stage_resources("light"),
    conda:
        "../envs/train.yaml"
    shell:
        "python -m lightning_opd.build_tokenizer --task-files {input.task:q} "
        "--vocab-size {params.vocab_size:q} --out {output:q} > {log:q} 2>&1"
