# Stage 1 (task data: the synthetic task, or real datasets when the config
# has a `data` section) and stage 2a (tokenizer).

if "data" in config:

    def dataset_options(spec):
        """The command-line options of a `data.<split>` entry, each value shell-quoted."""
        flags = {"split": "--split", "revision": "--revision", "problem_field": "--problem-field",
                 "problem_regex": "--problem-regex", "answer_field": "--answer-field", "seed": "--seed",
                 "limit": "--limit"}
        return " ".join(f"{flag} {shlex.quote(str(spec[key]))}" for key, flag in flags.items()
                        if spec.get(key) is not None)

    rule prepare_data:
        input:
            local=lambda w: [p for p in [config["data"][w.split]["source"]] if os.path.isfile(p)],
            code=code("prepare_data.py"),
        output:
            f"{R}/data/{{split}}.parquet",
        wildcard_constraints:
            split="sft|opd|eval",
        params:
            source=lambda w: shlex.quote(config["data"][w.split]["source"]),
            options=lambda w: dataset_options(config["data"][w.split]),
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
            "python -m lightning_opd.prepare_data --source {params.source} {params.options} "
            "--name {wildcards.split} --out {output} > {log} 2>&1"


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
