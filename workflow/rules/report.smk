# Stage 9: the report: accuracy and measured cost per model, cost of every
# stage (from the benchmark files), and the OPD training curves.


def stage_entry(stage, pattern):
    return {"stage": stage, "benchmark": bench(stage, pattern), "devices": devices(stage_kind(stage))}


def stage_kind(stage):
    """Which `resources` entry a rule uses."""
    return {"pretrain_teacher": "pretrain", "pretrain_student_base": "pretrain", "sft_data": "generate",
            "rollouts": "generate", "teacher_cache": "generate", "sft": "train", "lightning_opd": "train",
            "evaluate": "evaluate"}.get(stage, "default")


def report_manifest():
    models = []
    for t, spec in config["teachers"].items():
        models.append({"label": f"teacher-{t}", "role": "teacher", "teacher": t,
                       "cost": [stage_entry("pretrain_teacher", t)] if "build" in spec else []})
    models.append({"label": "student_base", "role": "student_base",
                   "cost": [stage_entry("pretrain_student_base", "")] if "build" in config["student_base"] else []})
    for t in RUNS["sft_teachers"]:
        models.append({"label": f"sft-{t}", "role": "sft", "sft_teacher": t,
                       "cost": [stage_entry("sft_data", t), stage_entry("sft", t)]})
    for sft_t, opd_t, seed in opd_runs():
        label = lightning_label(sft_t, opd_t, seed)
        pair = f"sft-{sft_t}_teacher-{opd_t}"
        models.append({"label": label, "role": "lightning_opd", "sft_teacher": sft_t, "opd_teacher": opd_t,
                       "seed": seed, "model_dir": f"{R}/models/{label}",
                       "cost": [stage_entry("rollouts", sft_t), stage_entry("teacher_cache", pair),
                                stage_entry("lightning_opd", f"{pair}_seed-{seed}")]})
    for m in models:
        m["eval"] = f"{R}/eval/{m['label']}.json"
    stages = [stage_entry("task_data", "")]
    if "build" in config["tokenizer"]:
        stages.append(stage_entry("tokenizer", ""))
    stages += [entry for m in models for entry in m["cost"] if entry not in stages]
    stages += [stage_entry("evaluate", m["label"]) for m in models]
    kind = "gpu" if any(res(k)["gpus"] for k in ("generate", "train", "evaluate")) else "cpu"
    return {"experiment": config["experiment"], "device_kind": kind, "models": models, "stages": stages,
            "eval": {"k": config["eval"]["k"]}}


rule report:
    input:
        evals=expand("{R}/eval/{model}.json", R=R, model=eval_labels()),
        opd_models=[f"{R}/models/{lightning_label(*run)}" for run in opd_runs()],
        code=code("report.py"),
    output:
        table_md=f"{R}/report/table.md",
        table_csv=f"{R}/report/table.csv",
        stages_md=f"{R}/report/stage_costs.md",
        stages_csv=f"{R}/report/stage_costs.csv",
        curve=f"{R}/report/opd_training_curve.png",
    params:
        manifest=js(report_manifest()),
        out_dir=f"{R}/report",
    log:
        logfile("report"),
    benchmark:
        bench("report")
    threads: 1
    conda:
        "../../envs/report.yaml"
    shell:
        "python -m lightning_opd.report --manifest {params.manifest} --out-dir {params.out_dir} > {log} 2>&1 "
        "&& cat {output.table_md}"
