"""Run by torchrun from test_distributed.py: a frozen model that rank 0 alone
loads and the other ranks build on the meta device (`load_for_fsdp`), sharded
over the processes with FSDP2 (`shard_frozen`), scores and samples exactly as
the whole model does, sampling stays in step when the processes' prompts
differ, and rank 1 never held a full copy of the weights (built on meta, its
peak RSS while loading and sharding grows by well under the model's size)."""
from __future__ import annotations

import resource
import sys

import pyarrow.parquet as pq
import torch

from lightning_opd.sampling import sample_with
from lightning_opd.hparams import SamplingParams, TrainParams
from lightning_opd.modeling import load_model
from lightning_opd.opd_trainer import response_logprobs, shard_frozen
from lightning_opd.training import PadCollator, load_for_fsdp, supervised_example


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(model_dir: str, rollouts: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    rows = pq.read_table(rollouts).to_pylist()[rank::2]  # different prompts on each process
    before = peak_rss_bytes()
    model = load_for_fsdp(model_dir, TrainParams(fsdp={"version": 2}), sharded=True).eval()
    on_meta = all(p.is_meta for p in model.parameters())
    assert on_meta == (rank != 0), f"rank {rank}: parameters on meta: {on_meta}"
    sharded = shard_frozen(model)
    grown = peak_rss_bytes() - before
    model_bytes = sum(p.numel() * p.element_size() for p in sharded.parameters()) * 2  # local shards x 2 ranks
    growth = [None, None]
    torch.distributed.all_gather_object(growth, grown)
    # rank 1 holds its half and one parameter in flight at a time; a full copy would be >= model_bytes
    assert growth[1] < 0.75 * model_bytes, (growth, model_bytes)

    whole = load_model(model_dir, device="cpu").eval()
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
    print(f"rank {rank}: sharded scoring and sampling match the whole model; peak RSS grew "
          f"{growth[rank] / 1e6:.0f} MB loading and sharding a {model_bytes / 1e6:.0f} MB model")


if __name__ == "__main__":
    main(*sys.argv[1:])
