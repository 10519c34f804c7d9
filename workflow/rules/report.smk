# Stage 9: the report: accuracy and measured cost per model, cost of every
# stage (from the benchmark files), and the OPD training curves.


rule report:
    input:
        evals=expand("{R}/eval/{model}.json", R=R, model=eval_labels()),
        opd_models=[f"{R}/models/{label}" for label in opd_labels()],
        code=code_inputs("report"),
    output:
        table_md=f"{R}/report/table.md",
        table_csv=f"{R}/report/table.csv",
        stages_md=f"{R}/report/stage_costs.md",
        stages_csv=f"{R}/report/stage_costs.csv",
        models_csv=f"{R}/report/models.csv",
        curve=f"{R}/report/opd_training_curve.png",
        cost_plot=f"{R}/report/accuracy_vs_cost.png",
    params:
        cmd=command("report"),
        manifest=js(report_manifest()),
        out_dir=lambda w, output: os.path.dirname(output.table_md),
    log:
        logfile("report"),
    benchmark:
        bench("report")
    threads: rule_threads("report")
    resources:
        **rule_resources("report"),
    conda:
        "../envs/report.yaml"
    shell:
        "{params.cmd} --manifest {params.manifest} --out-dir {params.out_dir:q} > {log:q} 2>&1 "
        "&& cat {output.table_md:q}"
