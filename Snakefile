# Lightning OPD: offline on-policy distillation as a Snakemake DAG.
# Rules live in workflow/rules/ (one file per stage); each calls one module of
# src/lightning_opd. See README.md for how to run it and DESIGN.md for why.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/default.yaml"


# An override file merges into config/default.yaml key by key; a model given
# by `path:` there replaces the default's `build:` of the same model.
for spec in [config["tokenizer"], config["student_base"], *config["teachers"].values()]:
    if spec.get("path"):
        spec.pop("build", None)

validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/sft.smk"
include: "workflow/rules/opd.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
