"""Run by torchrun from test_distributed.py: a frozen model sharded over the
processes with FSDP2 (`shard_frozen`) scores and samples exactly as the whole
model does, and sampling stays in step when the processes' prompts differ."""
from __future__ import annotations

import sys

import pyarrow.parquet as pq
import torch

from lightning_opd.sampling import sample_with
from lightning_opd.hparams import SamplingParams
from lightning_opd.modeling import load_model
from lightning_opd.opd_trainer import response_logprobs, shard_frozen
from lightning_opd.training import PadCollator, supervised_example


def main(model_dir: str, rollouts: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    rows = pq.read_table(rollouts).to_pylist()[rank::2]  # different prompts on each process
    whole = load_model(model_dir, device="cpu").eval()
    sharded = shard_frozen(load_model(model_dir, device="cpu").eval())
    batch = PadCollator(0)([supervised_example(r["prompt_ids"], r["response_ids"]) for r in rows])
    with torch.no_grad():
        expected, mask = response_logprobs(whole, batch)
        got, _ = response_logprobs(sharded, batch)
    assert torch.allclose(got[mask], expected[mask], atol=1e-6), (got - expected).abs().max()
    # rank 1 generates longer than rank 0: without syncing, the sharded forward passes would deadlock
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=4 + 6 * rank, seed=5, batch_size=16)
    prompts = [r["prompt_ids"] for r in rows]
    alone = sample_with(whole, prompts, params, stop_ids={-1}, pad_id=0, progress=False)
    together = sample_with(sharded, prompts, params, stop_ids={-1}, pad_id=0, progress=False, synced=True)
    assert [s[0].response_ids for s in alone] == [s[0].response_ids for s in together]
    torch.distributed.destroy_process_group()
    print(f"rank {rank}: sharded scoring and sampling match the whole model")


if __name__ == "__main__":
    main(*sys.argv[1:])
