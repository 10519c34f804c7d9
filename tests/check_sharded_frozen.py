"""Run by torchrun from test_distributed.py: a frozen model that rank 0 alone
loads and the other ranks build on the meta device (`load_for_fsdp`), sharded
over the processes with FSDP2 (`shard_frozen`), scores and samples exactly as
the whole model does, sampling stays in step when the processes' prompts
differ, and rank 1 never held a full copy of the weights (built on meta, its
peak RSS while loading and sharding grows by well under the model's size);
with DTensor parameters the chunked log-probs give the whole model's
gradients (averaged over the processes as FSDP does) and the drift KL, split
over the processes, the whole model's."""
from __future__ import annotations

import resource
import sys

import pyarrow.parquet as pq
import torch

from lightning_opd.hparams import SamplingParams, TrainParams
from lightning_opd.logprobs import drift_kl_sum, response_logprobs
from lightning_opd.modeling import load_model
from lightning_opd.opd_trainer import shard_frozen
from lightning_opd.sampling import sample_with
from lightning_opd.training import PadCollator, load_for_fsdp, supervised_example


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def response_mean(model, batch) -> torch.Tensor:
    logprobs, mask = response_logprobs(model, batch, chunk_tokens=3)  # several chunks, one of them short
    return (logprobs * mask).sum() / mask.sum()


def shard_like_accelerate(model):
    """The layout accelerate's FSDP2 gives a tied model (accelerate 1.1x,
    fsdp2_prepare_model): decoder layers, then [norm, embeddings, lm_head] as
    one unit kept gathered after forward, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard([model.model.norm, model.model.embed_tokens, model.lm_head], reshard_after_forward=False)
    fully_shard(model)
    return model


def check_gradients(model_dir: str, batch) -> None:
    whole = load_model(model_dir, device="cpu").train()
    response_mean(whole, batch).backward()
    for p in whole.parameters():
        torch.distributed.all_reduce(p.grad)
        p.grad /= torch.distributed.get_world_size()  # FSDP averages the processes' gradients
    assert max(p.grad.abs().max() for p in whole.parameters()) > 1e-3
    for shard in (shard_frozen, shard_like_accelerate):
        sharded = shard(load_model(model_dir, device="cpu")).train()
        assert type(sharded.lm_head.weight).__name__ == "DTensor"
        response_mean(sharded, batch).backward()
        for (name, p), q in zip(whole.named_parameters(), sharded.parameters()):
            assert torch.allclose(q.grad.full_tensor(), p.grad, atol=1e-6), (shard.__name__, name)


def check_drift(model_dir: str, reference_dir: str, batch) -> None:
    """Each process measures its own rows; the sums over the processes equal the whole batch's."""
    whole, reference = load_model(model_dir, device="cpu").eval(), load_model(reference_dir, device="cpu").eval()
    everything = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everything, batch)
    expected = [drift_kl_sum(whole, reference, b) for b in everything]
    got = torch.tensor(drift_kl_sum(shard_frozen(whole), shard_frozen(reference), batch, chunk_tokens=5),
                       dtype=torch.float64)
    torch.distributed.all_reduce(got)
    assert abs(got[0].item() - sum(e[0] for e in expected)) < 1e-4 * max(1.0, got[0].item()), (got, expected)
    assert got[1].item() == sum(e[1] for e in expected) and got[0].item() > 0


def main(model_dir: str, rollouts: str, reference_dir: str) -> None:
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
    check_gradients(model_dir, batch)
    check_drift(model_dir, reference_dir, batch)
    torch.distributed.destroy_process_group()
    print(f"rank {rank}: sharded scoring, sampling, gradients and drift match the whole model; peak RSS grew "
          f"{growth[rank] / 1e6:.0f} MB loading and sharding a {model_bytes / 1e6:.0f} MB model")


if __name__ == "__main__":
    main(*sys.argv[1:])
