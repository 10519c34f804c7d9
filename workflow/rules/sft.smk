# Stage 3 (a teacher writes the SFT data) and stage 4 (SFT of the student base -> pi_ref).


rule sft_data:
    input:
        teacher=lambda w: built(teacher_path(w.teacher)),
        prompts=f"{R}/data/sft.parquet",
        code=code_inputs("sft_data"),
    output:
        gen_output("sft_data", GEN_ARTIFACTS["sft_data"][0]),
    log:
        logfile("sft_data", gen_job("sft_data", "{teacher}")),
    benchmark:
        bench("sft_data", gen_job("sft_data", "{teacher}"))
    conda:
        "../envs/gen.yaml"
    threads: rule_threads("sft_data")
    resources:
        **rule_resources("sft_data"),
    params:
        cmd=command("sft_data", gen_job("sft_data", "{teacher}")),
        model=lambda w: teacher_path(w.teacher),
        backend=config["generation"]["backend"],
        backend_options=js(gen_option("sft_data", "backend_options")),
        sampling=js(config["sft_data"]["sampling"]),
        template=lambda w: config["prompt_template"],
        chat_template=js(config["chat_template_kwargs"]),
        shard_size=gen_option("sft_data", "shard_size"),
        data_parallel=engines("sft_data"),
        work_dir=f"{R}/checkpoints/sft_data",
        part=part_option,
    shell:
        "{params.cmd} --model {params.model:q} --prompts {input.prompts:q} --out {output:q} "
        "--label {wildcards.teacher:q} --backend {params.backend:q} --backend-options {params.backend_options} "
        "--sampling {params.sampling} --prompt-template {params.template:q} "
        "--chat-template-kwargs {params.chat_template} --shard-size {params.shard_size:q} "
        "--data-parallel {params.data_parallel:q} --work-dir {params.work_dir:q} {params.part:q} 2>&1 | tee {log:q}"


rule sft:
    input:
        base=built(student_base_path()),
        sft_data=f"{R}/sft_data/teacher-{{sft_teacher}}.parquet",
        code=code_inputs("sft"),
    output:
        directory(f"{R}/models/sft-{{sft_teacher}}"),
    log:
        logfile("sft", "{sft_teacher}"),
    benchmark:
        bench("sft", "{sft_teacher}")
    conda:
        "../envs/train.yaml"
    threads: rule_threads("sft")
    resources:
        **rule_resources("sft"),
    params:
        base=lambda w: student_base_path(),  # a param function of `input` would be left out of the rerun check
        train=js(config["sft"]["train"]),
        keep_unfinished=["--keep-unfinished"] if config["sft"]["keep_unfinished"] else [],
        ckpt=f"{R}/checkpoints/sft",
        cmd=command("sft", "{sft_teacher}"),
        tracking=lambda w: tracking("sft", f"sft-{w.sft_teacher}"),
    shell:
        "{params.cmd} --base {params.base:q} --sft-data {input.sft_data:q} --train {params.train} {params.keep_unfinished:q} "
        "--out {output:q} --checkpoint-root {params.ckpt:q} --tracking {params.tracking} 2>&1 | tee {log:q}"
