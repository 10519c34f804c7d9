"""The bench's avg@4 (`opd_regime.avg_at_k`) of the comparison grid's own A / A models, beside lm-eval's
(from `comparison_report_epyc/models.csv`). Run from the repository root:
`python bench/measured/opd_regime_epyc_pi_ref/evaluators_agree.py sft-A lightning-sft-A_teacher-A_seed-0 ...`"""
import csv
import sys

sys.path.insert(0, "bench")
import opd_regime  # noqa: E402

from lightning_opd.artifacts import TASK_SCHEMA, read_table  # noqa: E402
from lightning_opd.modeling import load_model, load_tokenizer  # noqa: E402

EXPERIMENT = "results/comparison"
tasks = read_table(f"{EXPERIMENT}/data/eval.parquet", TASK_SCHEMA)[0]
problems, answers = tasks.column("problem").to_pylist(), tasks.column("answer").to_pylist()
with open("bench/measured/comparison_report_epyc/models.csv") as table:
    lm_eval = {row["model"]: row["synth_arith avg@4"] for row in csv.DictReader(table)}
tokenizer = load_tokenizer(f"{EXPERIMENT}/models/sft-A")
for name in sys.argv[1:]:
    accuracy, errors = opd_regime.avg_at_k(load_model(f"{EXPERIMENT}/models/{name}"), tokenizer, problems, answers, 4)
    print(f"{name:<40} bench avg@4 {accuracy:.4f}  lm-eval {lm_eval.get(name, '?')}  wrong: {dict(errors)}", flush=True)
