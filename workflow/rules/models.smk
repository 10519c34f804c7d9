# Stage 2b: the tiny teachers and the student base of the embedded default,
# trained from scratch. Skipped for a model given by `path` in the config.


rule pretrain_teacher:
    input:
        tokenizer=built(tokenizer_path()),
        task=f"{R}/data/teacher.parquet",
        code=code_inputs("pretrain_teacher"),
    output:
        directory(f"{R}/models/teacher-{{teacher}}"),
    log:
        logfile("pretrain_teacher", "{teacher}"),
    benchmark:
        bench("pretrain_teacher", "{teacher}")
    conda:
        "../envs/train.yaml"
    threads: rule_threads("pretrain_teacher")
    resources:
        **rule_resources("pretrain_teacher"),
    params:
        tokenizer=lambda w: tokenizer_path(),  # a built one or a hub id
        style=lambda w: config["teachers"][w.teacher]["build"]["style"],
        arch=lambda w: js(config["teachers"][w.teacher]["build"]["arch"]),
        train=lambda w: js(config["teachers"][w.teacher]["build"]["train"]),
        ckpt=f"{R}/checkpoints/pretrain_teacher",
        cmd=command("pretrain_teacher", "{teacher}"),
        tracking=lambda w: tracking("pretrain_teacher", f"teacher-{w.teacher}"),
    shell:
        "{params.cmd} --tokenizer {params.tokenizer:q} --task-file {input.task:q} "
        "--corpus solutions --style {params.style:q} --arch {params.arch} --train {params.train} "
        "--label {wildcards.teacher:q} --out {output:q} --checkpoint-root {params.ckpt:q} --tracking {params.tracking} "
        "2>&1 | tee {log:q}"


rule pretrain_student_base:
    input:
        tokenizer=built(tokenizer_path()),
        task=f"{R}/data/teacher.parquet",
        code=code_inputs("pretrain_student_base"),
    output:
        directory(f"{R}/models/student_base"),
    log:
        logfile("pretrain_student_base"),
    benchmark:
        bench("pretrain_student_base")
    conda:
        "../envs/train.yaml"
    threads: rule_threads("pretrain_student_base")
    resources:
        **rule_resources("pretrain_student_base"),
    params:
        tokenizer=lambda w: tokenizer_path(),  # a built one or a hub id
        corpus=config["student_base"].get("build", {}).get("corpus"),
        arch=js(config["student_base"].get("build", {}).get("arch")),
        train=js(config["student_base"].get("build", {}).get("train")),
        ckpt=f"{R}/checkpoints/pretrain_student_base",
        cmd=command("pretrain_student_base", ""),
        tracking=tracking("pretrain_student_base", "student_base"),
    shell:
        "{params.cmd} --tokenizer {params.tokenizer:q} --task-file {input.task:q} "
        "--corpus {params.corpus:q} --arch {params.arch} --train {params.train} "
        "--label student_base --out {output:q} --checkpoint-root {params.ckpt:q} --tracking {params.tracking} "
        "2>&1 | tee {log:q}"
