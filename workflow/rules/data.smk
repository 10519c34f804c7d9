# Stage 1 (task data) and stage 2a (tokenizer).


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
    threads: 1
    conda:
        "../../envs/gen.yaml"
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
    threads: 1
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m lightning_opd.build_tokenizer --task-files {input.task} "
        "--vocab-size {params.vocab_size} --out {output} > {log} 2>&1"
