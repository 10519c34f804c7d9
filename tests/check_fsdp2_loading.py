"""Run by torchrun from test_distributed.py: the trained model's FSDP2 path
for real on CPU (gloo), as the Trainer takes it on GPUs. `load_for_fsdp` reads
the weights on rank 0 only (rank 1 builds the model on the meta device), and
accelerate's own `fsdp2_prepare_model` with cpu_ram_efficient_loading shards
it and broadcasts rank 0's weights. Checked: the sharded parameters equal the
whole model's, rank 1 never held a full copy (parameters on meta before
sharding; its peak RSS grows by well under the model's size), and one SGD
step of the OPD loss on the global batch, split over the two processes,
gives the weights of the same step in one process.

accelerate (1.15) does not set up FSDP when the processes run on the CPU:
AcceleratorState turns the FSDP plugin into DistributedType.FSDP only for
GPU-like multi-process types, and a CPU run is MULTI_CPU (its plugin is
dropped and the Trainer wraps the model in DDP). So here the plugin is
attached to the state by hand, as AcceleratorState does on GPUs, and the
function the Trainer's `accelerator.prepare` calls under FSDP2 runs as is."""
from __future__ import annotations

import resource
import sys

import pyarrow.parquet as pq
import torch

from lightning_opd.hparams import TrainParams
from lightning_opd.logprobs import response_logprobs
from lightning_opd.modeling import load_model
from lightning_opd.opd_loss import opd_loss
from lightning_opd.opd_trainer import opd_example
from lightning_opd.training import PadCollator, load_for_fsdp

LR = 0.5


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sgd_step(model, batch, n_tokens: int, scale: float) -> None:
    """One SGD step of the OPD loss normalised by the global batch's response tokens (as OPDTrainer does)."""
    student, mask = response_logprobs(model, batch)
    loss, _ = opd_loss(student, batch["teacher_logprobs"][:, 1:], mask, None, n_tokens)
    (loss * scale).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad


def main(model_dir: str, cache: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    before = peak_rss_bytes()
    model = load_for_fsdp(model_dir, TrainParams(fsdp={"version": 2}), sharded=True)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=True,
                                            auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=list(model._no_split_modules))
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert getattr(accelerator.state, "fsdp_plugin", None) is None and accelerator.distributed_type == "MULTI_CPU"
    on_meta = all(p.is_meta for p in model.parameters())
    assert on_meta == (rank != 0), f"rank {rank}: parameters on meta: {on_meta}"
    accelerator.state.fsdp_plugin = plugin
    sharded = fsdp2_prepare_model(accelerator, model)
    grown = peak_rss_bytes() - before
    assert type(sharded.lm_head.weight).__name__ == "DTensor"

    whole = load_model(model_dir, device="cpu")
    model_bytes = sum(p.numel() * p.element_size() for p in whole.parameters())
    for (name, p), q in zip(whole.named_parameters(), sharded.parameters(), strict=True):
        assert q.to_local().numel() < p.numel() or p.numel() < world, name  # a shard, not the whole
        assert torch.equal(q.full_tensor(), p), name
    growth = [None] * world
    torch.distributed.all_gather_object(growth, grown)
    # rank 1 never read the weights (on meta above); its RSS holds its half, the broadcast buffers
    # and what the allocator keeps of them (67-72 MB of 95 measured), a full copy on top >= model_bytes
    assert growth[1] < model_bytes, (growth, model_bytes)

    rows = pq.read_table(cache).to_pylist()[:4]
    examples = [opd_example(r["prompt_ids"], r["response_ids"], r["teacher_logprobs"]) for r in rows]
    n_tokens = sum(len(r["response_ids"]) for r in rows)
    collate = PadCollator(0)
    sgd_step(whole.train(), collate(examples), n_tokens, 1.0)  # one process, the whole batch
    # FSDP averages the processes' gradients: each scales its share of the global mean by the processes
    sgd_step(sharded.train(), collate(examples[rank::world]), n_tokens, float(world))
    moved = max((p - q).abs().max().item() for p, q in zip(whole.parameters(), load_model(model_dir).parameters()))
    assert moved > 1e-3, moved
    for (name, p), q in zip(whole.named_parameters(), sharded.parameters(), strict=True):
        assert torch.allclose(q.full_tensor(), p, atol=1e-6), (name, (q.full_tensor() - p).abs().max())
    torch.distributed.destroy_process_group()
    print(f"rank {rank}: accelerate's FSDP2 loading matches the whole model and its step; peak RSS grew "
          f"{growth[rank] / 1e6:.0f} MB loading and sharding a {model_bytes / 1e6:.0f} MB model")


if __name__ == "__main__":
    main(*sys.argv[1:])
