# Stage 1 (task data: the synthetic task, or real datasets when the config
# has a `data` section) and stage 2a (tokenizer).

if "data" in config:

    rule prepare_data:
        input:
            local=lambda w: [p for p in [dataset(w.split)["source"]] if os.path.isfile(p)],
            code=code("prepare_data.py"),
        output:
            f"{R}/data/{{split}}.parquet",
        wildcard_constraints:
            split="sft|opd|eval/[A-Za-z0-9_\\-]+",
        params:
            source=lambda w: shlex.quote(dataset(w.split)["source"]),
            hf_split=lambda w: shlex.quote(dataset(w.split).get("split", "train")),
            problem=lambda w: shlex.quote(dataset(w.split)["problem_field"]),
            answer=lambda w: (f"--answer-field {shlex.quote(dataset(w.split)['answer_field'])}"
                              if dataset(w.split).get("answer_field") else ""),
            limit=lambda w: f"--limit {int(dataset(w.split)['limit'])}" if dataset(w.split).get("limit") else "",
            name=lambda w: w.split.rpartition("/")[2],  # the id prefix: sft, opd or the benchmark
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
            "python -m lightning_opd.prepare_data --source {params.source} --split {params.hf_split} "
            "--problem-field {params.problem} {params.answer} {params.limit} --name {params.name} "
            "--out {output} > {log} 2>&1"


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
            "python -m lightning_opd.task_data --out-dir {params.out_dir} --hparams {params.task} > {log} 2>&1"


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
        "python -m lightning_opd.build_tokenizer --task-files {input.task} "
        "--vocab-size {params.vocab_size} --out {output} > {log} 2>&1"
