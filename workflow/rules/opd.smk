# Stage 5 (rollouts of pi_ref), stage 6 (teacher log-prob cache) and
# stage 7 (Lightning OPD: training from the cache, no teacher loaded), and
# the standard online OPD baseline (live student samples, live teacher scores).


rule rollouts:
    input:
        policy=f"{R}/models/sft-{{sft_teacher}}",
        prompts=f"{R}/data/opd.parquet",
        code=code_inputs("rollouts"),
    output:
        gen_output("rollouts", GEN_ARTIFACTS["rollouts"][0]),
    log:
        logfile("rollouts", gen_job("rollouts", "{sft_teacher}")),
    benchmark:
        bench("rollouts", gen_job("rollouts", "{sft_teacher}"))
    priority: CHAIN_PRIORITY
    conda:
        "../envs/gen.yaml"
    threads: rule_threads("rollouts")
    resources:
        **rule_resources("rollouts"),
    params:
        cmd=command("rollouts", gen_job("rollouts", "{sft_teacher}")),
        backend=config["generation"]["backend"],
        backend_options=js(gen_option("rollouts", "backend_options")),
        sampling=js(config["rollouts"]["sampling"]),
        template=lambda w: config["prompt_template"],
        chat_template=js(config["chat_template_kwargs"]),
        shard_size=gen_option("rollouts", "shard_size"),
        data_parallel=engines("rollouts"),
        work_dir=f"{R}/checkpoints/rollouts",
        part=part_option,
    shell:
        "{params.cmd} --model {input.policy:q} --prompts {input.prompts:q} --out {output:q} "
        "--label sft-{wildcards.sft_teacher:q} --backend {params.backend:q} "
        "--backend-options {params.backend_options} --sampling {params.sampling} "
        "--prompt-template {params.template:q} --chat-template-kwargs {params.chat_template} "
        "--shard-size {params.shard_size:q} "
        "--data-parallel {params.data_parallel:q} --work-dir {params.work_dir:q} {params.part:q} 2>&1 | tee {log:q}"


rule teacher_cache:
    input:
        teacher=lambda w: built(teacher_path(w.opd_teacher)),
        rollouts=GEN_ARTIFACTS["rollouts"][0],
        code=code_inputs("teacher_cache"),
    output:
        gen_output("teacher_cache", GEN_ARTIFACTS["teacher_cache"][0]),
    log:
        logfile("teacher_cache", gen_job("teacher_cache", "sft-{sft_teacher}_teacher-{opd_teacher}")),
    benchmark:
        bench("teacher_cache", gen_job("teacher_cache", "sft-{sft_teacher}_teacher-{opd_teacher}"))
    priority: CHAIN_PRIORITY
    conda:
        "../envs/gen.yaml"
    threads: rule_threads("teacher_cache")
    resources:
        **rule_resources("teacher_cache"),
    params:
        cmd=command("teacher_cache", gen_job("teacher_cache", "sft-{sft_teacher}_teacher-{opd_teacher}")),
        model=lambda w: teacher_path(w.opd_teacher),
        backend=config["teacher_cache"]["backend"],
        backend_options=js(config["teacher_cache"]["backend_options"]),
        max_tokens=config["teacher_cache"]["max_response_tokens"],
        temperature=config["teacher_cache"]["temperature"],
        top_k=config["teacher_cache"].get("top_k", 0),
        shard_size=config["teacher_cache"]["shard_size"],
        data_parallel=engines("teacher_cache"),
        work_dir=f"{R}/checkpoints/teacher_cache",
        part=part_option,
    shell:
        "{params.cmd} --teacher {params.model:q} --rollouts {input.rollouts:q} "
        "--out {output:q} --label {wildcards.opd_teacher:q} --backend {params.backend:q} "
        "--backend-options {params.backend_options} --max-response-tokens {params.max_tokens:q} "
        "--temperature {params.temperature:q} --top-k {params.top_k:q} --shard-size {params.shard_size:q} "
        "--data-parallel {params.data_parallel:q} --work-dir {params.work_dir:q} {params.part:q} 2>&1 | tee {log:q}"


rule lightning_opd:
    input:
        init=lightning_init,
        cache=lightning_cache,
        share=lightning_share,
        reference=f"{R}/models/sft-{{sft_teacher}}",
        drift_prompts=drift_prompts_input(),
        code=code_inputs("lightning_opd"),
    output:
        directory(f"{R}/models/lightning{{variant}}-sft-{{sft_teacher}}_teacher-{{opd_teacher}}_seed-{{seed}}{{round}}"),
    log:
        logfile("lightning_opd", "sft-{sft_teacher}_teacher-{opd_teacher}_seed-{seed}{variant}{round}"),
    benchmark:
        bench("lightning_opd", "sft-{sft_teacher}_teacher-{opd_teacher}_seed-{seed}{variant}{round}")
    priority: rounds_of  # CHAIN_PRIORITY in common.smk says why
    conda:
        "../envs/train.yaml"
    threads: rule_threads("lightning_opd")
    resources:
        **rule_resources("lightning_opd"),
    params:
        opd=opd_params,
        round=lambda w: f"{round_index(w)}-of-{rounds_of(w)}",
        share=lambda w, input: ["--prompt-share", input.share] if input.share else [],
        ckpt=f"{R}/checkpoints/lightning_opd",
        cmd=command("lightning_opd", "sft-{sft_teacher}_teacher-{opd_teacher}_seed-{seed}{variant}{round}"),
        tracking=lambda w: tracking(
            "lightning_opd", opd_label(f"lightning{w.variant}", w.sft_teacher, w.opd_teacher, w.seed) + w.round
        ),
        drift_n=config["opd_drift"]["n_prompts"],
        drift_prompts=lambda w, input: ["--drift-prompts", str(input.drift_prompts)] if input.drift_prompts else [],
        drift_tokens=config["opd_drift"]["max_new_tokens"],
        drift_every=config["opd_drift"].get("every_steps") or 0,
    shell:
        "{params.cmd} --init {input.init:q} --cache {input.cache:q} --opd {params.opd} "
        "--round {params.round:q} {params.share:q} --drift-reference {input.reference:q} "
        "--out {output:q} --checkpoint-root {params.ckpt:q} {params.drift_prompts:q} "
        "--drift-n {params.drift_n:q} --drift-max-new-tokens {params.drift_tokens:q} "
        "--drift-every {params.drift_every:q} --tracking {params.tracking} "
        "2>&1 | tee {log:q}"


# Multi-round Lightning OPD (lightning_opd.rounds or a variant's rounds = N > 1): round i > 1
# trains on the rollouts of round i-1's model on share i of N of the prompts, scored by the teacher.


rule prompt_share:
    input:
        prompts=f"{R}/data/opd.parquet",
        code=code_inputs("prompt_share"),
    output:
        prompt_share("{i}", "{n}"),
    log:
        logfile("prompt_share", "share-{i}-of-{n}"),
    benchmark:
        bench("prompt_share", "share-{i}-of-{n}")
    conda:
        "../envs/gen.yaml"
    threads: rule_threads("prompt_share")
    resources:
        **rule_resources("prompt_share"),
    params:
        cmd=command("prompt_share", "share-{i}-of-{n}"),
    shell:
        "{params.cmd} --prompts {input.prompts:q} --share {wildcards.i:q}-of-{wildcards.n:q} --out {output:q} "
        "2>&1 | tee {log:q}"


ROUND_RUN = "lightning{variant}-sft-{sft_teacher}_teacher-{opd_teacher}_seed-{seed}_round-{i}"


rule round_rollouts:
    input:
        policy=lambda w: round_model(w, int(w.i) - 1),
        prompts=lambda w: prompt_share(w.i, rounds_of(w)),
        code=code_inputs("round_rollouts"),
    output:
        f"{R}/rollouts/{ROUND_RUN}.parquet",
    log:
        logfile("round_rollouts", ROUND_RUN),
    benchmark:
        bench("round_rollouts", ROUND_RUN)
    priority: rounds_of  # as lightning_opd's
    conda:
        "../envs/gen.yaml"
    threads: rule_threads("round_rollouts")
    resources:
        **rule_resources("round_rollouts"),
    params:
        cmd=command("round_rollouts", ROUND_RUN),
        backend=config["generation"]["backend"],
        backend_options=js(gen_option("rollouts", "backend_options")),
        sampling=round_sampling,
        template=lambda w: config["prompt_template"],
        chat_template=js(config["chat_template_kwargs"]),
        shard_size=gen_option("rollouts", "shard_size"),
        data_parallel=engines("rollouts"),
        work_dir=f"{R}/checkpoints/rollouts",
    shell:
        "{params.cmd} --model {input.policy:q} --prompts {input.prompts:q} --out {output:q} "
        "--label round-{wildcards.i:q} --backend {params.backend:q} "
        "--backend-options {params.backend_options} --sampling {params.sampling} "
        "--prompt-template {params.template:q} --chat-template-kwargs {params.chat_template} "
        "--shard-size {params.shard_size:q} "
        "--data-parallel {params.data_parallel:q} --work-dir {params.work_dir:q} 2>&1 | tee {log:q}"


rule round_teacher_cache:
    input:
        teacher=lambda w: built(teacher_path(w.opd_teacher)),
        rollouts=f"{R}/rollouts/{ROUND_RUN}.parquet",
        code=code_inputs("round_teacher_cache"),
    output:
        f"{R}/cache/{ROUND_RUN}.parquet",
    log:
        logfile("round_teacher_cache", ROUND_RUN),
    benchmark:
        bench("round_teacher_cache", ROUND_RUN)
    priority: rounds_of  # as lightning_opd's
    conda:
        "../envs/gen.yaml"
    threads: rule_threads("round_teacher_cache")
    resources:
        **rule_resources("round_teacher_cache"),
    params:
        cmd=command("round_teacher_cache", ROUND_RUN),
        model=lambda w: teacher_path(w.opd_teacher),
        backend=config["teacher_cache"]["backend"],
        backend_options=js(config["teacher_cache"]["backend_options"]),
        max_tokens=config["teacher_cache"]["max_response_tokens"],
        temperature=config["teacher_cache"]["temperature"],
        top_k=config["teacher_cache"].get("top_k", 0),
        shard_size=config["teacher_cache"]["shard_size"],
        data_parallel=engines("teacher_cache"),
        work_dir=f"{R}/checkpoints/teacher_cache",
    shell:
        "{params.cmd} --teacher {params.model:q} --rollouts {input.rollouts:q} "
        "--out {output:q} --label {wildcards.opd_teacher:q} --backend {params.backend:q} "
        "--backend-options {params.backend_options} --max-response-tokens {params.max_tokens:q} "
        "--temperature {params.temperature:q} --top-k {params.top_k:q} --shard-size {params.shard_size:q} "
        "--data-parallel {params.data_parallel:q} --work-dir {params.work_dir:q} 2>&1 | tee {log:q}"


rule standard_opd:
    input:
        init=f"{R}/models/sft-{{sft_teacher}}",
        teacher=lambda w: built(teacher_path(w.opd_teacher)),
        prompts=f"{R}/data/opd.parquet",
        drift_prompts=drift_prompts_input(),
        code=code_inputs("standard_opd"),
    output:
        directory(f"{R}/models/standard-sft-{{sft_teacher}}_teacher-{{opd_teacher}}_seed-{{seed}}"),
    log:
        logfile("standard_opd", "sft-{sft_teacher}_teacher-{opd_teacher}_seed-{seed}"),
    benchmark:
        bench("standard_opd", "sft-{sft_teacher}_teacher-{opd_teacher}_seed-{seed}")
    priority: STANDARD_PRIORITY
    conda:
        "../envs/online.yaml"
    threads: rule_threads("standard_opd")
    resources:
        **rule_resources("standard_opd"),
    params:
        teacher=lambda w: teacher_path(w.opd_teacher),
        teacher_temperature=config["teacher_cache"]["temperature"],  # the live teacher scores as the cache's
        opd=standard_opd_params,
        sampling=js(config["standard_opd"]["sampling"]),
        sampler=config["standard_opd"].get("sampler", "hf"),
        sampler_options=js(config["standard_opd"].get("sampler_options", {})),
        template=lambda w: config["prompt_template"],
        chat_template=js(config["chat_template_kwargs"]),
        ckpt=f"{R}/checkpoints/standard_opd",
        cmd=command("standard_opd", "sft-{sft_teacher}_teacher-{opd_teacher}_seed-{seed}"),
        tracking=lambda w: tracking("standard_opd", opd_label("standard", w.sft_teacher, w.opd_teacher, w.seed)),
        drift_n=config["opd_drift"]["n_prompts"],
        drift_prompts=lambda w, input: ["--drift-prompts", str(input.drift_prompts)] if input.drift_prompts else [],
        drift_tokens=config["opd_drift"]["max_new_tokens"],
        drift_every=config["opd_drift"].get("every_steps") or 0,
    shell:
        "{params.cmd} --init {input.init:q} --teacher {params.teacher:q} "
        "--teacher-label {wildcards.opd_teacher:q} --teacher-temperature {params.teacher_temperature:q} "
        "--prompts {input.prompts:q} --opd {params.opd} "
        "--sampling {params.sampling} --sampler {params.sampler:q} --sampler-options {params.sampler_options} "
        "--prompt-template {params.template:q} "
        "--chat-template-kwargs {params.chat_template} --out {output:q} "
        "--checkpoint-root {params.ckpt:q} {params.drift_prompts:q} --drift-n {params.drift_n:q} "
        "--drift-max-new-tokens {params.drift_tokens:q} --drift-every {params.drift_every:q} "
        "--tracking {params.tracking} 2>&1 | tee {log:q}"
