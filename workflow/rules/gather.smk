# A generation stage split over jobs (`jobs` > 1 under generation, sft_data,
# rollouts or teacher_cache) runs as one job per part of its shards (the
# stage's own rule with --part i-of-n) and this job, which joins the parts.

for gen_stage, (artifact, schema, job) in GEN_ARTIFACTS.items():
    if not split(gen_stage):
        continue

    rule:
        name:
            f"{gen_stage}_gather"
        input:
            parts=lambda w, gen_stage=gen_stage, artifact=artifact: getattr(gather, gen_stage)(
                gen_output(gen_stage, artifact), **dict(w.items())
            ),
            code=code_inputs(f"{gen_stage}_gather"),
        output:
            artifact,
        log:
            logfile(f"{gen_stage}_gather", job),
        benchmark:
            bench(f"{gen_stage}_gather", job)
        conda:
            "../envs/gen.yaml"
        threads: rule_threads(f"{gen_stage}_gather")
        resources:
            **rule_resources(f"{gen_stage}_gather"),
        params:
            cmd=command(f"{gen_stage}_gather", job),
            schema=schema,
        shell:
            "{params.cmd} --gather {input.parts:q} --schema {params.schema:q} --out {output:q} " "2>&1 | tee {log:q}"
