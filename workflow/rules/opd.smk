# Stage 5 (rollouts of pi_ref), stage 6 (teacher log-prob cache) and
# stage 7 (Lightning OPD: training from the cache, no teacher loaded), and
# the standard online OPD baseline (live student samples, live teacher scores).


rule rollouts:
    input:
        policy=f"{R}/models/sft-{{sft_teacher}}",
        prompts=f"{R}/data/opd.parquet",
        code=code("generate.py", *BACKEND_CODE),
    output:
        f"{R}/rollouts/sft-{{sft_teacher}}.parquet",
    params:
        backend=config["generation"]["backend"],
        backend_options=js(config["generation"]["backend_options"]),
        sampling=js(config["rollouts"]["sampling"]),
        template=lambda w: shlex.quote(config["prompt_template"]),
    log:
        logfile("rollouts", "{sft_teacher}"),
    benchmark:
        bench("rollouts", "{sft_teacher}")
    threads: res("generate")["cpus"]
    resources:
        **stage_resources("generate"),
    conda:
        "../envs/gen.yaml"
    shell:
        "python -m lightning_opd.generate --model {input.policy} --prompts {input.prompts} --out {output} "
        "--label sft-{wildcards.sft_teacher} --backend {params.backend} "
        "--backend-options {params.backend_options} --sampling {params.sampling} "
        "--prompt-template {params.template} 2>&1 | tee {log}"


rule teacher_cache:
    input:
        teacher=lambda w: built(teacher_path(w.opd_teacher)),
        rollouts=f"{R}/rollouts/sft-{{sft_teacher}}.parquet",
        code=code("teacher_cache.py", *BACKEND_CODE),
    output:
        f"{R}/cache/sft-{{sft_teacher}}_teacher-{{opd_teacher}}.parquet",
    params:
        model=lambda w: teacher_path(w.opd_teacher),
        backend=config["teacher_cache"]["backend"],
        backend_options=js(config["teacher_cache"]["backend_options"]),
        max_tokens=config["teacher_cache"]["max_response_tokens"],
        temperature=config["teacher_cache"]["temperature"],
    log:
        logfile("teacher_cache", "sft-{sft_teacher}_teacher-{opd_teacher}"),
    benchmark:
        bench("teacher_cache", "sft-{sft_teacher}_teacher-{opd_teacher}")
    threads: res("generate")["cpus"]
    resources:
        **stage_resources("generate"),
    conda:
        "../envs/gen.yaml"
    shell:
        "python -m lightning_opd.teacher_cache --teacher {params.model} --rollouts {input.rollouts} "
        "--out {output} --label {wildcards.opd_teacher} --backend {params.backend} "
        "--backend-options {params.backend_options} --max-response-tokens {params.max_tokens} "
        "--temperature {params.temperature} 2>&1 | tee {log}"


rule lightning_opd:
    input:
        init=f"{R}/models/sft-{{sft_teacher}}",
        cache=f"{R}/cache/sft-{{sft_teacher}}_teacher-{{opd_teacher}}.parquet",
        drift_prompts=eval_data(next(iter(BENCHMARKS))),  # the first benchmark's problems
        code=code("lightning_opd.py", "opd_trainer.py", "opd_loss.py", "backends/hf.py", *TRAIN_CODE),
    output:
        directory(f"{R}/models/lightning-sft-{{sft_teacher}}_teacher-{{opd_teacher}}_seed-{{seed}}"),
    params:
        opd=opd_params,
        ckpt=f"{R}/checkpoints/lightning_opd",
        launch=launch("train"),
        drift_n=config["opd_drift"]["n_prompts"],
        drift_tokens=config["opd_drift"]["max_new_tokens"],
    log:
        logfile("lightning_opd", "sft-{sft_teacher}_teacher-{opd_teacher}_seed-{seed}"),
    benchmark:
        bench("lightning_opd", "sft-{sft_teacher}_teacher-{opd_teacher}_seed-{seed}")
    threads: res("train")["cpus"]
    resources:
        **stage_resources("train"),
    conda:
        "../envs/train.yaml"
    shell:
        "{params.launch} lightning_opd.lightning_opd --init {input.init} --cache {input.cache} --opd {params.opd} "
        "--out {output} --checkpoint-root {params.ckpt} --drift-prompts {input.drift_prompts} "
        "--drift-n {params.drift_n} --drift-max-new-tokens {params.drift_tokens} 2>&1 | tee {log}"


rule standard_opd:
    input:
        init=f"{R}/models/sft-{{sft_teacher}}",
        teacher=lambda w: built(teacher_path(w.opd_teacher)),
        prompts=f"{R}/data/opd.parquet",
        drift_prompts=eval_data(next(iter(BENCHMARKS))),  # the first benchmark's problems
        code=code("standard_opd.py", "opd_trainer.py", "opd_loss.py", "backends/hf.py", *TRAIN_CODE),
    output:
        directory(f"{R}/models/standard-sft-{{sft_teacher}}_teacher-{{opd_teacher}}_seed-{{seed}}"),
    params:
        teacher=lambda w: teacher_path(w.opd_teacher),
        opd=opd_params,
        sampling=js(config["standard_opd"]["sampling"]),
        template=lambda w: shlex.quote(config["prompt_template"]),
        ckpt=f"{R}/checkpoints/standard_opd",
        launch=launch("train"),
        drift_n=config["opd_drift"]["n_prompts"],
        drift_tokens=config["opd_drift"]["max_new_tokens"],
    log:
        logfile("standard_opd", "sft-{sft_teacher}_teacher-{opd_teacher}_seed-{seed}"),
    benchmark:
        bench("standard_opd", "sft-{sft_teacher}_teacher-{opd_teacher}_seed-{seed}")
    threads: res("train")["cpus"]
    resources:
        **stage_resources("train"),
    conda:
        "../envs/train.yaml"
    shell:
        "{params.launch} lightning_opd.standard_opd --init {input.init} --teacher {params.teacher} "
        "--teacher-label {wildcards.opd_teacher} --prompts {input.prompts} --opd {params.opd} "
        "--sampling {params.sampling} --prompt-template {params.template} --out {output} "
        "--checkpoint-root {params.ckpt} --drift-prompts {input.drift_prompts} --drift-n {params.drift_n} "
        "--drift-max-new-tokens {params.drift_tokens} 2>&1 | tee {log}"
