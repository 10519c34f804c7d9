"""What a job pays before it does any work: the wall seconds a fresh Python
takes to import each stage's module and the model class it loads (torch,
transformers, Qwen3's modeling code and, for the trainers, transformers'
Trainer). At the embedded default the OPD jobs
last 10-60 s, so this start-up is a large part of the stage costs in
``stage_costs.md``: Lightning OPD's stage runs three such jobs (rollouts,
teacher cache, training) where standard OPD runs one.

    python bench/startup_cost.py --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

STAGES = {  # stage: the module its rule runs
    "rollouts": "lightning_opd.generate",
    "teacher_cache": "lightning_opd.teacher_cache",
    "lightning_opd": "lightning_opd.lightning_opd",
    "standard_opd": "lightning_opd.standard_opd",
}
METHODS = {"Lightning OPD": ("rollouts", "teacher_cache", "lightning_opd"), "standard OPD": ("standard_opd",)}


def import_seconds(module: str) -> float:
    """A fresh interpreter imports ``module`` and the embedded default's model class (transformers imports a
    model's code lazily, when a job first loads the model)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}; from transformers import Qwen3ForCausalLM"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh interpreters per module (the median is kept)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    medians = {}
    print(f"{'stage':<15} {'module (+ Qwen3ForCausalLM)':<30} {'median s':>8} {'min s':>6} {'max s':>6}")
    for stage, module in STAGES.items():
        import_seconds(module)  # warms the file cache, so that the first timed import is not charged for it
        times = [import_seconds(module) for _ in range(args.repeats)]
        medians[stage] = statistics.median(times)
        print(f"{stage:<15} {module:<30} {medians[stage]:>8.2f} {min(times):>6.2f} {max(times):>6.2f}", flush=True)
    for method, stages in METHODS.items():
        print(f"{method}: {len(stages)} job(s), {sum(medians[s] for s in stages):.2f} s of imports")


if __name__ == "__main__":
    main()
