"""Stage 7: Lightning OPD. The student starts from pi_ref and trains on the
fixed rollouts with the teacher's cached log-probs; no teacher is loaded.

Before training it checks the cache: one log-prob per token, the student's
tokenizer, rollouts sampled by the init model, and a cache teacher equal to
the teacher that wrote the init model's SFT data (unless the config allows a
mismatch on purpose, which the output then records). A top-k loss
(``loss: topk_reverse_kl | topk_forward_kl``) needs a top-k cache with at
least the loss's k tokens per position.

Round I of multi-round Lightning OPD (``--round I-of-N``) is the same stage:
round 1 trains pi_ref on the cache's rows of its prompt share
(``--prompt-share``), round I > 1 trains round I-1's model on the cache of
its own fresh rollouts. Drift is measured against pi_ref
(``--drift-reference``) and the training log continues round I-1's. The
optimiser state goes on from round to round too (written with each round's
model but the last): a fresh Adam per round would take near sign-sized
first steps every round."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from lightning_opd.artifacts import ArtifactError, cache_top_k, read_cache
from lightning_opd.hparams import OPDParams, parse_hparams
from lightning_opd.modeling import DEFAULT_PROMPT_TEMPLATE, check_context, load_tokenizer, vocab_size
from lightning_opd.opd_loss import LOSSES
from lightning_opd.opd_trainer import OPDTrainer, add_output_arguments, drift_reference, opd_example
from lightning_opd.prompt_share import share_ids
from lightning_opd.provenance import (
    check_same_tokenizer,
    check_teacher_consistency,
    describe_model,
    file_sha256,
    read_train_log,
    sft_teacher_of,
)
from lightning_opd.shards import Part
from lightning_opd.training import (
    OPTIMIZER_STATE_DIR,
    accumulation,
    check_outputs_writable,
    checkpoint_dir,
    collator,
    end_process_group,
    frozen_dtype,
    load_for_fsdp,
    params_record,
    save_final,
    tracking_params,
    train_with_resume,
    training_arguments,
    world_size,
)


def loss_top_k(cache_path: Path, meta: dict, params: OPDParams) -> int:
    """k of the loss: 0 for the sampled loss; for a top-k loss, ``params.top_k``
    or all of the cache's k, refused when the cache holds fewer."""
    if params.loss not in LOSSES:
        raise ValueError(f"--opd loss {params.loss!r} (lightning_opd.loss): use one of {list(LOSSES)}")
    if params.loss == "sampled":
        return 0
    stored = cache_top_k(meta)
    k = params.top_k or stored
    if not stored or k > stored:
        raise ArtifactError(
            f"{cache_path}: lightning_opd.loss {params.loss} needs the teacher's top {k or 'k'} tokens at every "
            f"position (lightning_opd.top_k {params.top_k}), but this cache holds the top {stored} "
            f"(teacher_cache.top_k {stored}): set teacher_cache.top_k to at least {k or 1} and rerun the "
            "teacher_cache stage, or lower lightning_opd.top_k")
    if k < 1:
        raise ValueError(f"--opd top_k (lightning_opd.top_k) must be positive, got {k}")
    return k


def rows_of_prompts(table, ids: set[str], cache_path: Path, share_path: Path):
    """The rows of rollouts of the prompts ``ids`` (a rollout's id is its prompt's, or ``<prompt id>#<k>``)."""
    prompt_of = [i if i in ids else i.rpartition("#")[0] for i in table.column("id").to_pylist()]
    keep = [n for n, prompt in enumerate(prompt_of) if prompt in ids]
    if not keep:
        raise ArtifactError(f"{cache_path}: no rollout of the prompts of {share_path}: the share comes from "
                            "other OPD prompts; delete it and rerun the prompt_share stage")
    return table.take(keep)


def load_checked_cache(cache_path: Path, init: dict, tokenizer, allow_mismatch: bool,
                       params: OPDParams | None = None, share: Path | None = None) -> tuple[CacheRows, dict]:
    """The training set of a checked cache (of the rollouts of ``share``'s prompts, given one) and the
    cache's provenance. The set keeps the cache's Arrow columns (and its top k, given a top-k loss,
    as numpy arrays): a row becomes a training example only when a batch loads it, so a paper-scale
    cache (a top-k one above all) is never held as Python lists."""
    table, meta = read_cache(cache_path)
    if share is not None:
        table = rows_of_prompts(table, share_ids(share), cache_path, share)
    check_same_tokenizer(cache_path, meta, tokenizer, f"the student {init['path']}")
    if meta["rollout_policy"]["fingerprint"] != init["fingerprint"]:
        raise ArtifactError(f"{cache_path}: the rollouts were sampled by {meta['rollout_policy']['path']} "
                            f"({meta['rollout_policy']['fingerprint']}), not by the OPD init model "
                            f"{init['path']} ({init['fingerprint']})")
    consistent = check_teacher_consistency(sft_teacher_of(init), meta["teacher"], allow_mismatch, str(cache_path))
    k = loss_top_k(cache_path, meta, params or OPDParams())
    lengths = pc.add(*(pc.list_value_length(table.column(c)) for c in ("prompt_ids", "response_ids")))
    check_context(init["path"], dict(zip(table.column("id").to_pylist(), lengths.to_pylist())), cache_path,
                  "lower teacher_cache.max_response_tokens or rollouts.sampling.max_new_tokens")
    if not k:
        return CacheRows(table), {**meta, "teacher_consistent": consistent}
    stored, width = cache_top_k(meta), vocab_size(init["path"])
    top = TopK(table, stored, k)
    if top.ids.size and int(top.ids.max()) >= width:
        token = int(np.flatnonzero((top.ids >= width).any(1))[0])
        row, largest = int(np.searchsorted(top.starts, token, side="right")) - 1, int(top.ids[token].max())
        raise ArtifactError(f"{cache_path}: row {table.column('id')[row].as_py()!r} has top-k token id {largest}, "
                            f"outside the {width}-token output of the student {init['path']}: the cache comes from "
                            "another model family; delete it and rerun the teacher_cache stage")
    return CacheRows(table, top), {**meta, "teacher_consistent": consistent, "loss_top_k": k}


class TopK:
    """The teacher's k most likely tokens and their log-probs at every response token of a cache, as two
    (tokens, k) numpy arrays in the cache's dtypes (k / stored of the bytes of its two Arrow columns), with
    each row's first token at ``starts[row]``. A loaded row takes its slice: the top k are never held as
    Python lists, nor made into a Python object per number."""

    def __init__(self, table, stored: int, k: int):
        # the first k of each position are the teacher's k most likely tokens (canonical order)
        def first_k(column: str) -> np.ndarray:
            values = pc.list_flatten(table.column(column)).to_numpy(zero_copy_only=False)
            if values.size != stored * int(self.starts[-1]):  # read_cache checks every row; a table that skipped it
                raise ValueError(f"{column}: {values.size} values for {int(self.starts[-1])} response tokens "
                                 f"x {stored} stored")
            return np.ascontiguousarray(values.reshape(-1, stored)[:, :k])

        lengths = pc.list_value_length(table.column("response_ids")).to_numpy(zero_copy_only=False)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        self.ids, self.logprobs = first_k("teacher_topk_ids"), first_k("teacher_topk_logprobs")

    def of_row(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        span = slice(self.starts[row], self.starts[row + 1])
        return self.ids[span], self.logprobs[span]


class CacheRows(torch.utils.data.Dataset):
    """A cache's rows (and, given, their top k) as OPD training examples, each made when a batch loads it;
    the rows stay in the cache's Arrow columns. A torch dataset, not a ``datasets.Dataset``: a transform
    set on one is pickled whole to fingerprint it, a transient copy of every top-k array."""

    def __init__(self, table, top: TopK | None = None):
        self.table, self.top = table.select(["prompt_ids", "response_ids", "teacher_logprobs"]), top

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitems__(self, indices: list[int]) -> list[dict]:
        if bad := [i for i in indices if not 0 <= i < len(self)]:
            raise IndexError(f"rows {bad} of a training set of {len(self)} cached rollouts")
        if not indices:
            return []
        # one-row slices, no copy: Table.take joins every chunk of a column (one per cache shard) first
        rows = pa.concat_tables([self.table.slice(int(i), 1) for i in indices]).to_pydict()
        return [opd_example(prompt, response, logprobs, *(self.top.of_row(row) if self.top else ()))
                for row, prompt, response, logprobs in zip(indices, rows["prompt_ids"], rows["response_ids"],
                                                           rows["teacher_logprobs"])]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True, help="pi_ref: the SFT model that sampled the rollouts")
    parser.add_argument("--cache", type=Path, required=True, help="teacher cache parquet")
    parser.add_argument("--opd", default="{}", help="JSON of OPDParams fields")
    parser.add_argument("--round", type=Part.parse, default=Part(1, 1),
                        help="I-of-N: round I of N (default 1-of-1: the paper's single round)")
    parser.add_argument("--prompt-share", type=Path,
                        help="train only on the cache's rollouts of these prompts (round 1 of N > 1)")
    parser.add_argument("--drift-reference", help="pi_ref, for the drift KL (default: --init)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    params = parse_hparams(OPDParams, args.opd, "--opd")
    tracking = tracking_params(args.tracking)
    check_outputs_writable(args.out, args.checkpoint_root)

    init = describe_model(args.init)
    tokenizer = load_tokenizer(args.init)
    dataset, meta = load_checked_cache(args.cache, init, tokenizer, params.allow_teacher_mismatch, params,
                                       args.prompt_share)
    earlier_rounds = read_train_log(args.init) if args.round.index > 1 else []
    print(f"Lightning OPD{f' round {args.round}' if args.round.count > 1 else ''} on {len(dataset)} cached "
          f"rollouts, teacher {meta['teacher'].get('label')} "
          f"({'consistent' if meta['teacher_consistent'] else 'INCONSISTENT'} with the SFT teacher), loss "
          f"{params.loss}" + (f" over the teacher's top {meta['loss_top_k']}" if params.loss != "sampled" else ""))
    key = {"stage": "lightning_opd", "init": init["fingerprint"], "cache": file_sha256(args.cache),
           "opd": params_record(params),
           **({"prompt_share": file_sha256(args.prompt_share)} if args.prompt_share else {})}
    model = load_for_fsdp(args.init, params)
    reference, drift_batches = drift_reference(
        args.drift_reference or args.init, tokenizer, args.drift_prompts, args.drift_n,
        meta["rollouts"].get("prompt_template") or DEFAULT_PROMPT_TEMPLATE, args.drift_max_new_tokens,
        accumulation(params, world_size())[0], frozen_dtype(params), meta["rollouts"].get("chat_template_kwargs"))
    carried = Path(args.init) / OPTIMIZER_STATE_DIR if args.round.index > 1 else None
    trainer = OPDTrainer(model=model, tau=params.tau, loss=params.loss, reference=reference,
                         drift_batches=drift_batches, drift_every=args.drift_every, optimizer_state=carried,
                         # the output in the key: two runs of one config (a variant equal to the main run)
                         # must not share checkpoints, which each removes as it ends
                         args=training_arguments(params, checkpoint_dir(args.checkpoint_root,
                                                                        {**key, "out": str(args.out)}), tracking),
                         train_dataset=dataset,
                         data_collator=collator(params, tokenizer.pad_token_id))
    train_with_resume(trainer)
    save_final(trainer, tokenizer, args.out, {
        **key, "method": "lightning_opd", "init_model": init, "teacher": meta["teacher"],
        "sft_teacher": sft_teacher_of(init), "teacher_consistent": meta["teacher_consistent"],
        "loss": params.loss, "loss_top_k": meta.get("loss_top_k", 0),
        "chat_template_kwargs": meta["rollouts"].get("chat_template_kwargs", {}),
        "round": args.round.index, "rounds": args.round.count,
        "optimizer_state": f"round {args.round.index - 1}'s" if carried else "fresh",
    }, earlier_log=earlier_rounds, optimizer_state=args.round.index < args.round.count)
    print(f"-> {args.out}")
    end_process_group()


if __name__ == "__main__":
    main()
