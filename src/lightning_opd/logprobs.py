"""Every log-prob the project computes from a transformers causal LM, with
memory bounded by a chunk of tokens rather than by the whole batch.

A full log-softmax over Qwen3's 151,936-wide output costs 0.6 MB per token in
fp32, and autograd keeps several such copies: a 16K-token micro-batch would
need ~40 GB for log-probs alone. Here the output layer is applied to a chunk
of tokens at a time (logits upcast to fp32 per chunk), only at the positions
asked for, and in training each chunk is checkpointed: backward recomputes
its logits instead of keeping them, as fused linear cross-entropy kernels do.
The extra memory is O(chunk x vocab) whatever the number of tokens.

The chunks run inside the model's own forward, in place of its output layer
(`get_output_embeddings()`): under FSDP the output layer's weight is gathered
exactly when the model's forward (and backward) would gather it, so the same
code runs on one device, under DDP and with FSDP2 (DTensor) parameters.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from accelerate.utils import extract_model_from_parallel
from torch.utils.checkpoint import checkpoint

# fp32 logits of one chunk: 128 MiB is 220 tokens at Qwen3's 151,936-wide
# output (one vocabulary-sized matmul of 220 tokens still fills a GPU) and
# the whole micro-batch at the tiny models' 512
CHUNK_BYTES = 128 * 2 ** 20

Linear = Callable[[torch.Tensor], torch.Tensor]


def default_chunk_tokens(model) -> int:
    """Tokens per chunk such that the chunk's fp32 logits take `CHUNK_BYTES`."""
    vocab_size = extract_model_from_parallel(model).get_output_embeddings().weight.shape[0]
    return max(1, CHUNK_BYTES // (4 * vocab_size))


@contextmanager
def _output_layer_replaced(model, compute: Callable[[torch.Tensor, Linear], torch.Tensor]):
    """While inside, the model's forward hands its final hidden states to
    ``compute(hidden, linear)`` instead of its output layer, and returns what
    that gives as ``logits``; ``linear`` is the output layer without its hooks.
    FSDP's hooks on the layer (and on the model) still run around the call."""
    inner = extract_model_from_parallel(model)
    config = getattr(inner, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        raise NotImplementedError(f"{type(inner).__name__}: the output layer's logits are soft-capped after the "
                                  "layer, which chunked log-probs do not reproduce")
    head = inner.get_output_embeddings()
    linear, patched = head.forward, head.__dict__.get("forward")
    head.forward = lambda hidden: compute(hidden, linear)
    try:
        yield
    finally:
        if patched is None:
            del head.forward  # back to the class's forward
        else:
            head.forward = patched


def _forward(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
    return model(**model_inputs, use_cache=False).logits


def _target_logprobs(linear: Linear, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = linear(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def _chunked_target_logprobs(hidden: torch.Tensor, linear: Linear, targets: torch.Tensor, select: torch.Tensor,
                             temperature: float, chunk: int) -> torch.Tensor:
    picked_hidden, picked_targets = hidden[select], targets[select]
    pieces = []
    for h, t in zip(picked_hidden.split(chunk), picked_targets.split(chunk)):
        if torch.is_grad_enabled():
            # saves the chunk's hidden states only; backward recomputes its logits
            pieces.append(checkpoint(_target_logprobs, linear, h, t, temperature,
                                     use_reentrant=False, preserve_rng_state=False))
        else:
            pieces.append(_target_logprobs(linear, h, t, temperature))
    values = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    return torch.zeros(select.shape, dtype=torch.float32, device=hidden.device).masked_scatter(select, values)


def next_token_logprobs(model, inputs: dict[str, torch.Tensor], select: torch.Tensor, temperature: float = 1.0,
                        chunk_tokens: int | None = None) -> torch.Tensor:
    """log pi(x_{t+1} | x_{<=t}) / temperature-scaled, shape (batch, tokens - 1),
    at the positions where ``select`` (same shape) is true, 0 elsewhere.
    ``inputs``: input_ids and attention_mask (padded) or position_ids (packed).
    Differentiable when grad is enabled; chunks of ``chunk_tokens`` tokens
    (default: `CHUNK_BYTES` of fp32 logits)."""
    ids = inputs["input_ids"]
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1))  # position t predicts token t + 1
    where = torch.nn.functional.pad(select.bool(), (0, 1))
    chunk = chunk_tokens or default_chunk_tokens(model)

    def compute(hidden, linear):
        return _chunked_target_logprobs(hidden, linear, targets, where, temperature, chunk)

    with _output_layer_replaced(model, compute):
        return _forward(model, inputs)[:, :-1]


def _top_k(linear: Linear, hidden: torch.Tensor, targets: torch.Tensor, k: int, temperature: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = linear(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    total = logits.logsumexp(-1, keepdim=True)
    best, ids = logits.topk(k, dim=-1)
    return (logits.gather(-1, targets[:, None]) - total).squeeze(-1), ids, best - total


@torch.no_grad()
def next_token_top_k(model, inputs: dict[str, torch.Tensor], select: torch.Tensor, k: int, temperature: float = 1.0,
                     chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `next_token_logprobs` (no gradient), and the ``k`` most likely next
    tokens: (log-prob of the next token (batch, tokens - 1), their ids and
    log-probs (batch, tokens - 1, k)), 0 where ``select`` is false. The order
    within the k is torch.topk's: sort it where an order matters."""
    ids = inputs["input_ids"]
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1))
    where = torch.nn.functional.pad(select.bool(), (0, 1))
    chunk = chunk_tokens or default_chunk_tokens(model)
    found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def compute(hidden, linear):
        found.extend(_top_k(linear, h, t, k, temperature)
                     for h, t in zip(hidden[where].split(chunk), targets[where].split(chunk)))
        return hidden.new_zeros(where.shape)  # the results leave through `found`

    with _output_layer_replaced(model, compute):
        _forward(model, inputs)
    target = torch.zeros(where.shape, dtype=torch.float32, device=ids.device)
    top_ids = torch.zeros((*where.shape, k), dtype=torch.long, device=ids.device)
    top_logprobs = torch.zeros((*where.shape, k), dtype=torch.float32, device=ids.device)
    if found:
        target[where], top_ids[where], top_logprobs[where] = (torch.cat(parts) for parts in zip(*found))
    return target[:, :-1], top_ids[:, :-1], top_logprobs[:, :-1]


def _support_logprobs(linear: Linear, hidden: torch.Tensor, targets: torch.Tensor, support: torch.Tensor
                      ) -> torch.Tensor:
    """(c, 2 + k): log-probs of the target, of all tokens outside ``support``
    together (-inf when the support is the whole vocabulary), of each support id."""
    logits = linear(hidden).float()
    total = logits.logsumexp(-1, keepdim=True)
    picked = logits.gather(-1, torch.cat([targets[:, None], support], -1)) - total
    if support.shape[-1] < logits.shape[-1]:  # the ids are distinct (read_cache): some tokens lie outside
        rest = logits.scatter(-1, support, float("-inf")).logsumexp(-1, keepdim=True) - total
    else:  # no tail: a constant, since the gradient of an empty logsumexp is NaN
        rest = torch.full_like(total, float("-inf"))
    return torch.cat([picked[:, :1], rest, picked[:, 1:]], -1)


def response_support_logprobs(model, batch: dict[str, torch.Tensor], support: torch.Tensor,
                              chunk_tokens: int | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every position whose next token is a response token: log pi_theta of
    that token (batch, tokens - 1), of the tokens outside ``support`` together
    (batch, tokens - 1; -inf where ``support`` covers the vocabulary), of each
    token of ``support`` (batch, tokens - 1, k; ids, e.g. the teacher's top k);
    and the mask of those positions. Chunked and checkpointed like
    `next_token_logprobs`: the extra memory is O(chunk x vocab) too."""
    mask = _response_mask(batch["labels"])
    targets = torch.nn.functional.pad(batch["input_ids"][:, 1:], (0, 1))
    where = torch.nn.functional.pad(mask, (0, 1))
    ids = torch.nn.functional.pad(support.long(), (0, 0, 0, 1))
    chunk = chunk_tokens or default_chunk_tokens(model)

    def compute(hidden, linear):
        pieces = []
        for h, t, s in zip(hidden[where].split(chunk), targets[where].split(chunk), ids[where].split(chunk)):
            if torch.is_grad_enabled():
                pieces.append(checkpoint(_support_logprobs, linear, h, t, s, use_reentrant=False,
                                         preserve_rng_state=False))
            else:
                pieces.append(_support_logprobs(linear, h, t, s))
        width = 2 + ids.shape[-1]
        values = torch.cat(pieces) if pieces else hidden.new_zeros((0, width), dtype=torch.float32)
        out = torch.zeros((*where.shape, width), dtype=torch.float32, device=hidden.device)
        return out.masked_scatter(where[..., None], values)

    with _output_layer_replaced(model, compute):
        packed = _forward(model, batch)[:, :-1]
    return packed[..., 0], packed[..., 1], packed[..., 2:], mask


def _response_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a response token, (batch, tokens - 1)."""
    # imported here: the scoring backends use this module without the training stack
    from lightning_opd.training import IGNORE_INDEX
    return labels[:, 1:] != IGNORE_INDEX


def response_logprobs(model, batch: dict[str, torch.Tensor], chunk_tokens: int | None = None,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_theta of every next token that is a response token, else 0;
    the mask of those positions), both (batch, tokens - 1). Padded batches
    (attention_mask) and packed ones (position_ids) alike."""
    mask = _response_mask(batch["labels"])
    return next_token_logprobs(model, batch, mask, temperature=temperature, chunk_tokens=chunk_tokens), mask


def _kl_per_token(hidden: torch.Tensor, linear: Linear, reference_hidden: torch.Tensor, reference_linear: Linear,
                  select: torch.Tensor, chunk: int) -> torch.Tensor:
    values = []
    for h, r in zip(hidden[select].split(chunk), reference_hidden[select].split(chunk)):
        current = torch.log_softmax(linear(h).float(), dim=-1)
        reference = torch.log_softmax(reference_linear(r).float(), dim=-1)
        values.append((current.exp() * (current - reference)).sum(-1))
    values = torch.cat(values) if values else hidden.new_zeros(0, dtype=torch.float32)
    return torch.zeros(select.shape, dtype=torch.float32, device=hidden.device).masked_scatter(select, values)


@torch.no_grad()
def drift_kl_sum(model, reference, batch: dict[str, torch.Tensor], chunk_tokens: int | None = None
                 ) -> tuple[float, int]:
    """(sum over the response positions of ``batch`` of the exact per-token
    KL(pi_theta || pi_ref) over the full vocabulary, number of those positions).
    The reference's forward runs inside the model's, at its output layer, so
    that both output layers are gathered (under FSDP) while the chunks need them."""
    select = torch.nn.functional.pad(_response_mask(batch["labels"]), (0, 1))
    chunk = chunk_tokens or default_chunk_tokens(model)

    def in_reference(reference_hidden, reference_linear):
        def in_model(hidden, linear):
            return _kl_per_token(hidden, linear, reference_hidden, reference_linear, select, chunk)
        with _output_layer_replaced(model, in_model):
            return _forward(model, batch)

    with _output_layer_replaced(reference, in_reference):
        kl = _forward(reference, batch)
    return float(kl.sum()), int(select.sum())
