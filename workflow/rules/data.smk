# Stage 1 (task data: the synthetic task, or real datasets when the config
# has a `data` section) and stage 2a (tokenizer).

if "data" in config:

    rule prepare_data:
        input:
            local=lambda w: [p for p in [dataset(w.split)["source"]] if os.path.isfile(p)],
            code=code_inputs("prepare_data"),
        output:
            f"{R}/data/{{split}}.parquet",
        log:
            logfile("prepare_data", "{split}"),
        benchmark:
            bench("prepare_data", "{split}")
        wildcard_constraints:
            split="sft|opd|eval/[A-Za-z0-9_\\-]+",
        conda:
            "../envs/train.yaml"
        threads: rule_threads("prepare_data")
        resources:
            **rule_resources("prepare_data"),
        params:
            cmd=command("prepare_data", "{split}"),
            source=lambda w: dataset(w.split)["source"],
            options=lambda w: dataset_options(dataset(w.split)),
            name=lambda w: w.split.rpartition("/")[2],  # the id prefix: sft, opd or the benchmark
        shell:
            "{params.cmd} --source {params.source:q} {params.options:q} "
            "--name {params.name:q} --out {output:q} > {log:q} 2>&1"

else:

    rule task_data:
        input:
            code=code_inputs("task_data"),
        output:
            expand("{R}/data/{split}.parquet", R=R, split=["teacher", "sft", "opd", "eval"]),
        log:
            logfile("task_data"),
        benchmark:
            bench("task_data")
        conda:
            "../envs/gen.yaml"
        threads: rule_threads("task_data")
        resources:
            **rule_resources("task_data"),
        params:
            cmd=command("task_data", ""),
            task=js(config["task"]),
            out_dir=lambda w, output: os.path.dirname(output[0]),
        shell:
            "{params.cmd} --out-dir {params.out_dir:q} --hparams {params.task} > {log:q} 2>&1"


rule tokenizer:
    input:
        task=f"{R}/data/teacher.parquet",
        code=code_inputs("tokenizer"),
    output:
        directory(f"{R}/models/tokenizer"),
    log:
        logfile("tokenizer"),
    benchmark:
        bench("tokenizer")
    conda:
        "../envs/train.yaml"
    threads: rule_threads("tokenizer")
    resources:
        **rule_resources("tokenizer"),
    params:
        cmd=command("tokenizer", ""),
        vocab_size=lambda w: config["tokenizer"]["build"]["vocab_size"],
    shell:
        "{params.cmd} --task-files {input.task:q} " "--vocab-size {params.vocab_size:q} --out {output:q} > {log:q} 2>&1"
