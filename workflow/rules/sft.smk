# Stage 3 (a teacher writes the SFT data) and stage 4 (SFT of the student base -> pi_ref).


rule sft_data:
    input:
        teacher=lambda w: built(teacher_path(w.teacher)),
        prompts=f"{R}/data/sft.parquet",
        code=code("generate.py", *BACKEND_CODE),
    output:
        f"{R}/sft_data/teacher-{{teacher}}.parquet",
    params:
        model=lambda w: teacher_path(w.teacher),
        backend=config["generation"]["backend"],
        backend_options=js(config["generation"]["backend_options"]),
        sampling=js(config["sft_data"]["sampling"]),
<<<<<<< HEAD
        template=lambda w: shlex.quote(config["prompt_template"]),
        chat_template=js(config["chat_template_kwargs"]),
=======
        template=lambda w: config["prompt_template"],
>>>>>>> 6029502 (Validation at read and write, complete checkpoints only, a non-finite guard, quoted shell lines, safe config patterns, config references checked)
    log:
        logfile("sft_data", "{teacher}"),
    benchmark:
        bench("sft_data", "{teacher}")
    threads: res("generate")["cpus"]
    resources:
        **stage_resources("generate"),
    conda:
        "../envs/gen.yaml"
    shell:
<<<<<<< HEAD
        "python -m lightning_opd.generate --model {params.model} --prompts {input.prompts} --out {output} "
        "--label {wildcards.teacher} --backend {params.backend} --backend-options {params.backend_options} "
        "--sampling {params.sampling} --prompt-template {params.template} "
        "--chat-template-kwargs {params.chat_template} 2>&1 | tee {log}"
=======
        "python -m lightning_opd.generate --model {params.model:q} --prompts {input.prompts:q} --out {output:q} "
        "--label {wildcards.teacher:q} --backend {params.backend:q} --backend-options {params.backend_options} "
        "--sampling {params.sampling} --prompt-template {params.template:q} 2>&1 | tee {log:q}"
>>>>>>> 6029502 (Validation at read and write, complete checkpoints only, a non-finite guard, quoted shell lines, safe config patterns, config references checked)


rule sft:
    input:
        base=built(student_base_path()),
        sft_data=f"{R}/sft_data/teacher-{{sft_teacher}}.parquet",
        code=code("sft.py", *TRAIN_CODE),
    output:
        directory(f"{R}/models/sft-{{sft_teacher}}"),
    params:
        base=lambda w, input: input.base or student_base_path(),
        train=js(config["sft"]["train"]),
        keep_unfinished=["--keep-unfinished"] if config["sft"]["keep_unfinished"] else [],
        ckpt=f"{R}/checkpoints/sft",
        launch=launch("train"),
        tracking=lambda w: tracking("sft", f"sft-{w.sft_teacher}"),
    log:
        logfile("sft", "{sft_teacher}"),
    benchmark:
        bench("sft", "{sft_teacher}")
    threads: res("train")["cpus"]
    resources:
        **stage_resources("train"),
    conda:
        "../envs/train.yaml"
    shell:
<<<<<<< HEAD
        "{params.launch} lightning_opd.sft --base {params.base} --sft-data {input.sft_data} --train {params.train} {params.keep_unfinished} "
        "--out {output} --checkpoint-root {params.ckpt} --tracking {params.tracking} 2>&1 | tee {log}"
=======
        "{params.launch} lightning_opd.sft --base {params.base:q} --sft-data {input.sft_data:q} --train {params.train} {params.keep_unfinished:q} "
        "--out {output:q} --checkpoint-root {params.ckpt:q} 2>&1 | tee {log:q}"
>>>>>>> 6029502 (Validation at read and write, complete checkpoints only, a non-finite guard, quoted shell lines, safe config patterns, config references checked)
