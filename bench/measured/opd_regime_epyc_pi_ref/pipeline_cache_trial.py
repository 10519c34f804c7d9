"""A bench Lightning OPD trial trained on the pipeline's own cache (`results/comparison/cache/sft-A_teacher-A.parquet`:
pi_ref's rollouts and the teacher's log-probs, as the pipeline's Lightning OPD runs read them) instead of rollouts the
bench samples itself: does the pipeline's result come from its one cache or from its trainer? Run from the repository
root with the bench's arguments, e.g. `python bench/measured/opd_regime_epyc_pi_ref/pipeline_cache_trial.py
results/comparison method=lightning,roll_t=1.0,roll_p=1.0,prompts=8192,epochs=3.75,batch=256,lr=6e-4,seed=0`."""
import sys

import pyarrow.parquet as pq

sys.path.insert(0, "bench")
import opd_regime  # noqa: E402

from lightning_opd.opd_trainer import opd_example  # noqa: E402

CACHE = "results/comparison/cache/sft-A_teacher-A.parquet"


def cached_rollouts(policy, teacher, prompts, trial, seed, stop, pad):
    """The pipeline's cached rollouts and teacher log-probs, in place of the bench's own (one round only)."""
    table = pq.read_table(CACHE, columns=["prompt_ids", "response_ids", "teacher_logprobs"]).to_pydict()
    examples = [opd_example(p, r, t) for p, r, t in
                zip(table["prompt_ids"], table["response_ids"], table["teacher_logprobs"])]
    print(f"  {len(examples)} rollouts from {CACHE}", flush=True)
    return pad(examples)


opd_regime.scored_rollouts = cached_rollouts
opd_regime.main()
