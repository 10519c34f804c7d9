# Stage 9: the report: accuracy on every benchmark and measured cost per model, cost of every
# stage (from the benchmark files), the tokens per optimiser step of both OPD methods, the OPD
# training curves and the resolved config. The outputs marked report() make
# `snakemake --report report.html`, with the captions of workflow/report/.

REPORT_MANIFEST = report_manifest()


rule report:
    input:
        evals=expand("{R}/eval/{benchmark}/{model}.json", R=R, benchmark=BENCHMARKS, model=eval_labels()),
        # every model the pipeline trained: the report reads their provenance and training logs
        models=[m["model_dir"] for m in REPORT_MANIFEST["models"] if "model_dir" in m],
        caches=sorted({f"{R}/cache/sft-{s}_teacher-{t}.parquet" for s, t, _ in opd_runs()}),
        code=code_inputs("report"),
    output:
        table_html=report(
            f"{R}/report/table.html",
            caption="../report/accuracy_table.rst",
            category="1. Accuracy and cost",
            labels={"result": "accuracy and cost per model"},
        ),
        cost_plot=report(
            f"{R}/report/accuracy_vs_cost.png",
            caption="../report/accuracy_vs_cost.rst",
            category="1. Accuracy and cost",
            labels={"result": "accuracy against OPD cost"},
        ),
        table_md=f"{R}/report/table.md",
        table_csv=f"{R}/report/table.csv",
        models_csv=f"{R}/report/models.csv",
        curve=report(
            f"{R}/report/opd_training_curve.png",
            caption="../report/training_curves.rst",
            category="2. OPD training",
            labels={"result": "training curves"},
        ),
        stages_html=report(
            f"{R}/report/stage_costs.html",
            caption="../report/stage_costs.rst",
            category="3. Stage costs",
            labels={"result": "cost of every stage"},
        ),
        stages_md=f"{R}/report/stage_costs.md",
        tokens_html=report(
            f"{R}/report/token_budget.html",
            caption="../report/token_budget.rst",
            category="3. Stage costs",
            labels={"result": "tokens per optimiser step of each OPD method"},
        ),
        tokens_md=f"{R}/report/token_budget.md",
        tokens_csv=f"{R}/report/token_budget.csv",
        caches_md=f"{R}/report/cache_state.md",
        stages_csv=f"{R}/report/stage_costs.csv",
        config_html=report(
            f"{R}/report/config.html",
            caption="../report/config.rst",
            category="4. Config",
            labels={"result": "resolved config"},
        ),
        config_yaml=report(
            f"{R}/report/config.yaml",
            caption="../report/config.rst",
            category="4. Config",
            labels={"result": "resolved config (YAML, for --configfile)"},
        ),
    log:
        logfile("report"),
    benchmark:
        bench("report")
    conda:
        "../envs/report.yaml"
    threads: rule_threads("report")
    resources:
        **rule_resources("report"),
    params:
        cmd=command("report"),
        manifest=js(REPORT_MANIFEST),
        config=lambda w: js(config),  # a function: the prompt template's {problem} is no wildcard
        out_dir=lambda w, output: os.path.dirname(output.table_md),
    shell:
        # through stdin: one argument of an exec is at most 128 KiB, and a manifest of many seeds is more
        # (printf is the shell's own; Snakemake runs a command this long as a script)
        "printf '%s' {params.manifest} | {params.cmd} --manifest - --config {params.config} --out-dir {params.out_dir:q} "
        "> {log:q} 2>&1 && cat {output.table_md:q}"
