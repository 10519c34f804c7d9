"""One row per draw of the default experiment (its report's models.csv): teacher, pi_ref, standard OPD,
Lightning OPD with the sampled loss and with top-k 16, the share of the pi_ref -> teacher gap each
recovers and the final drift from pi_ref; then the mean and std over the draws.

    python bench/measured/draws_zen4_avx512/summary.py results/default/report/models.csv \\
        results/draw*/report/models.csv
"""
from __future__ import annotations

import sys

import pandas as pd

MODELS = {"standard": "standard-sft-A_teacher-A_seed-0", "lightning": "lightning-sft-A_teacher-A_seed-0",
          "topk16": "lightning-topk16-sft-A_teacher-A_seed-0"}


def draw_row(path: str) -> dict:
    models = pd.read_csv(path).set_index("model")
    accuracy, drift = models["synth_arith avg@4"], models["drift_kl_ref"]
    ref, gap = accuracy["sft-A"], accuracy["teacher-A"] - accuracy["sft-A"]
    row = {"draw": path.split("/")[-3], "teacher": accuracy["teacher-A"], "pi_ref": ref}
    row.update({name: accuracy[model] for name, model in MODELS.items()})
    row["L-S"] = 100 * (row["lightning"] - row["standard"])
    row.update({f"share {name}": (accuracy[model] - ref) / gap for name, model in MODELS.items()})
    row.update({f"drift {name}": drift[model] for name, model in MODELS.items()})
    return row


if __name__ == "__main__":
    table = pd.DataFrame([draw_row(path) for path in sys.argv[1:]])
    pd.set_option("display.width", 250)
    print(table.round(3).to_string(index=False))
    print(table.drop(columns="draw").agg(["mean", "std"]).round(3).to_string())
