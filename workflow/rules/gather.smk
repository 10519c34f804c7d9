# A generation stage split over jobs (`jobs` > 1 under generation, sft_data,
# rollouts or teacher_cache) runs as one job per part of its shards (the
# stage's own rule with --part i-of-n) and this job, which joins the parts.

for stage, (artifact, schema, job) in GEN_ARTIFACTS.items():
    if not split(stage):
        continue

    rule:
        name:
            f"{stage}_gather"
        input:
            parts=lambda w, stage=stage, artifact=artifact: getattr(gather, stage)(
                gen_output(stage, artifact), **dict(w.items())),
            code=code_inputs(f"{stage}_gather"),
        output:
            artifact,
        params:
            cmd=command(f"{stage}_gather"),
            schema=schema,
        log:
            logfile(f"{stage}_gather", job),
        benchmark:
            bench(f"{stage}_gather", job)
        threads: rule_threads(f"{stage}_gather")
        resources:
            **rule_resources(f"{stage}_gather"),
        conda:
            "../envs/gen.yaml"
        shell:
            "{params.cmd} --gather {input.parts:q} --schema {params.schema:q} --out {output:q} "
            "2>&1 | tee {log:q}"
