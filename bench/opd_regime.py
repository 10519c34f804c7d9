"""In which regime does the sampled-token OPD loss lift pi_ref? Trains pi_ref
of a finished experiment in-process, one trial per setting, and prints avg@k
on the held-out set next to pi_ref and the teacher:

* ``lightning``: one fixed set of pi_ref rollouts (``roll_t``/``roll_p``:
  temperature and top-p, ``n`` rollouts per prompt), scored once by the
  teacher (log-prob of the sampled token), then ``epochs`` passes over it;
* ``standard``: every step the current student samples ``n`` responses to
  each of ``batch`` prompts (same temperature and top-p) and the live teacher
  scores them, ``epochs`` passes over the prompts: as the pipeline, the same
  steps as a lightning trial with n = 1;
* ``exact``: the lightning trial's rollouts, trained with the exact per-token
  reverse KL over the vocabulary (needs the live teacher; a reference).

Diagnostics that are not the paper's method: ``rounds`` (lightning: fresh
rollouts of the current student every 1/R of the steps, on 1/R of the
prompts, one Adam throughout; ``round_policy=ref``: sampled by pi_ref
instead, a control), ``adv`` (drop some negative advantages, weight
tokens by min(1, pi_theta / pi_ref), or subtract the mean advantage) and ``embed`` (freeze or untie
the tied embeddings). ``trace=K`` also prints avg@k after every K steps. ``prompts`` above the
experiment's number of OPD prompts adds more, drawn as `task_data` would draw that many OPD prompts:
distinct problems of the same kind. `task_data` draws the held-out problems right after the OPD prompts,
so they come next: ``held_out=exclude`` (the default) leaves them out, ``allow`` trains on them.

Every trial uses the project's OPD loss (`opd_loss`), AdamW (0.9, 0.98),
weight decay 0.1, gradient clipping 1.0, constant lr, like the trainers.
A trial is ``key=value`` pairs separated by commas, changed from the defaults
(printed first); ``seed`` seeds rollouts and batch order. On a GPU every trial runs there.

    python bench/opd_regime.py results/default \\
        method=lightning,roll_t=0.7,roll_p=0.9 method=lightning,roll_t=1.0,roll_p=1.0
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from math_verify import parse, verify

from lightning_opd.artifacts import TASK_SCHEMA, read_table
from lightning_opd.hparams import SamplingParams, TaskParams
from lightning_opd.logprobs import response_logprobs
from lightning_opd.modeling import load_model, load_tokenizer, pick_device, prompt_ids, stop_token_ids
from lightning_opd.opd_loss import opd_loss
from lightning_opd.opd_trainer import opd_example
from lightning_opd.sampling import sample_with
from lightning_opd.task_data import build_splits, recorded_task
from lightning_opd.training import PadCollator


@dataclasses.dataclass
class Trial:
    method: str = "lightning"  # lightning | standard | exact
    roll_t: float = 0.7
    roll_p: float = 0.9
    n: int = 1
    prompts: int = 512  # the first this many OPD prompts
    epochs: float = 2.0
    batch: int = 64  # sequences per step (standard: prompts per step)
    lr: float = 1e-5
    tau: float | None = 1.0
    # both: the paper's loss | pos: drop the negative advantages | fresh: drop them where the student is already
    # a nat below pi_ref | is: weight each token by min(1, pi_theta / pi_ref) | center: subtract the batch's mean
    # (clipped) advantage from every token's, a baseline (ablations, not the paper's loss)
    adv: str = "both"
    embed: str = "train"  # train | freeze: the (tied) embeddings | untie: separate input and output embeddings
    rounds: int = 1  # lightning: R rounds, each on fresh rollouts of the current student for 1/R of the prompts
    round_policy: str = "student"  # who samples a round's rollouts: the current student | ref: pi_ref (a control)
    teacher_t: float = 1.0  # the teacher's softmax temperature wherever it scores (both methods)
    trace: int = 0  # also print avg@k after every this many steps (0: only at the end)
    # prompts > the experiment's: its own, then task_data's next draws, the held-out problems first: left out
    # (exclude) or trained on (allow)
    held_out: str = "exclude"
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> Trial:
        trial, fields = cls(), {f.name for f in dataclasses.fields(cls)}
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            if key not in fields:
                raise SystemExit(f"trial {text!r}: unknown key {key!r}; the keys are {sorted(fields)}")
            kind = type(getattr(cls, key))  # the default's type: str, float or int
            try:
                setattr(trial, key, None if value == "none" else kind(value))
            except ValueError:
                raise SystemExit(f"trial {text!r}: {key}={value!r} is not a {kind.__name__}") from None
            if key in CHOICES and value not in CHOICES[key]:
                raise SystemExit(f"trial {text!r}: {key} is one of {CHOICES[key]}, not {value!r}")
            number = getattr(trial, key)
            if kind in (int, float) and number is not None and not (math.isfinite(number) and number >= LEAST[key]):
                raise SystemExit(f"trial {text!r}: {key} must be a finite number >= {LEAST[key]}, not {value!r}")
        if trial.method == "standard" and (trial.rounds != 1 or trial.round_policy != "student"):
            raise SystemExit(f"trial {text!r}: rounds and round_policy are for lightning and exact trials")
        return trial


# the least value of each numeric key (tau's none, no clipping, is allowed)
LEAST = {"roll_t": 0.0, "roll_p": 0.0, "n": 1, "prompts": 1, "epochs": 0.0, "batch": 1, "lr": 0.0, "tau": 0.0,
         "rounds": 1, "teacher_t": 1e-6, "trace": 0, "seed": 0}
CHOICES = {"method": ("lightning", "standard", "exact"), "adv": ("both", "pos", "fresh", "is", "center"),
           "embed": ("train", "freeze", "untie"), "round_policy": ("student", "ref"),
           "held_out": ("allow", "exclude")}


STEP = re.compile(r"(-?\d+) ([+-]) (\d+) = (-?\d+)")


def error_kind(text: str) -> str:
    """Of a wrong answer: ``arithmetic`` (a step whose result is wrong), ``unboxed`` or ``structure`` (every
    step right, but a wrong operand copied, a step added or missing)."""
    if "boxed" not in text:
        return "unboxed"
    steps = STEP.findall(text)
    return "arithmetic" if any(int(a) + (int(b) if op == "+" else -int(b)) != int(c)
                               for a, op, b, c in steps) else "structure"


def avg_at_k(model, tokenizer, problems, answers, k: int) -> tuple[float, collections.Counter]:
    """avg@k with the evaluation's sampling (temperature 0.6, top-p 0.95), and the kinds of wrong answers."""
    prompts = [prompt_ids(tokenizer, p) for p in problems]
    params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=128, n=k, seed=0, batch_size=512)
    outs = sample_with(model.eval(), prompts, params, stop_token_ids(model, tokenizer), tokenizer.pad_token_id,
                       progress=False)
    texts = [(a, tokenizer.decode(s.response_ids, skip_special_tokens=True)) for a, samples in zip(answers, outs)
             for s in samples]
    right = [bool(verify(parse(f"${a}$"), parse(text))) for a, text in texts]
    errors = collections.Counter(error_kind(text) for (_, text), ok in zip(texts, right) if not ok)
    return sum(right) / len(right), errors


def more_prompts(tokenizer, prompts: list, n: int, task: TaskParams, held_out: set[str], exclude: bool) -> list:
    """``prompts`` if there are ``n``; else the OPD split that `task_data` draws for ``n`` OPD prompts: the
    experiment's ``prompts`` first, then more distinct problems from the same draw, none of them in the teacher
    or SFT split. The first of those are the experiment's ``held_out`` problems (`task_data` draws them right
    after the OPD prompts), unless ``exclude``, which leaves them out and draws that many more."""
    if n <= len(prompts):
        return prompts
    texts: list[str] = []
    extra = 0
    while len(texts) < n:
        drawn = build_splits(dataclasses.replace(task, n_opd=n + extra, n_eval=0))["opd"]
        texts = [row["problem"] for row in drawn if not (exclude and row["problem"] in held_out)]
        extra += n - len(texts)
    ids = [prompt_ids(tokenizer, text) for text in texts[:n]]
    if ids[:len(prompts)] != prompts:
        raise SystemExit(f"the task recorded in the experiment's data/opd.parquet ({task}) does not draw its "
                         f"{len(prompts)} OPD prompts again: cannot add more of the same draw")
    print(f"  {n} OPD prompts: {len(set(texts[:n]) & held_out)} of them held out")
    return ids


def scaled(teacher, temperature: float, path: Path):
    """The teacher (loaded from ``path``) with its logits divided by ``temperature``; its input embeddings
    stay as they are."""
    if temperature == 1.0:
        return teacher
    copy = load_model(path).eval()
    copy.config.tie_word_embeddings = False
    copy.lm_head.weight = torch.nn.Parameter(copy.get_input_embeddings().weight.detach().clone() / temperature)
    return copy


def scored_rollouts(policy, teacher, prompts, trial: Trial, seed: int, stop, pad):
    """``trial.n`` samples of ``policy`` per prompt, as OPD examples with the teacher's token log-probs."""
    params = SamplingParams(temperature=trial.roll_t, top_p=trial.roll_p, max_new_tokens=128, n=trial.n,
                            seed=seed, batch_size=512)
    outs = sample_with(policy.eval(), prompts, params, stop, pad.pad_id, progress=False)
    policy.train()
    examples = [opd_example(p, s.response_ids, [0.0] * len(s.response_ids)) for p, o in zip(prompts, outs) for s in o]
    batch = pad(examples)
    batch["teacher_logprobs"] = scored(teacher, batch)
    if trial.adv in ("fresh", "is"):  # the sampling policy's own log-probs: only these ablations read them
        batch["ref_logprobs"] = scored(policy, batch)
    return batch


@torch.no_grad()
def scored(model, batch, rows_at_once: int = 1024) -> torch.Tensor:
    """``model``'s log-prob of every response token of ``batch`` (0 elsewhere), aligned with its columns;
    ``rows_at_once`` rows a forward, so that tens of thousands of rollouts fit in memory."""
    parts = [response_logprobs(model, rows(batch, slice(i, i + rows_at_once)))[0]
             for i in range(0, len(batch["input_ids"]), rows_at_once)]
    return torch.nn.functional.pad(torch.cat(parts), (1, 0))


def rows(batch, index):
    return {k: v[index] for k, v in batch.items()}


def centered_opd_loss(lp, teacher_lp, mask, tau):
    """The OPD loss with a baseline: the batch's mean clipped advantage is subtracted from every token's. On the
    student's own samples the baseline leaves the expected gradient unchanged (E_theta[grad log pi_theta] = 0),
    up to each token's own share in the mean; on pi_ref's samples it removes the term
    mean(A) * E_ref[grad log pi_theta], which pushes the student away from pi_ref when the mean advantage is
    negative."""
    loss, metrics = opd_loss(lp, teacher_lp, mask, tau)
    mask = mask.to(lp.dtype)
    baseline = metrics["advantage"]
    return loss + baseline * (lp * mask).sum() / mask.sum().clamp(min=1.0), metrics


def step(student, teacher, optimizer, batch, trial: Trial, exact: bool) -> dict:
    if exact:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        mask = (batch["labels"][:, 1:] != -100).float()
        with torch.no_grad():
            t = torch.log_softmax(teacher(**inputs).logits[:, :-1].float(), -1)
        s = torch.log_softmax(student(**inputs).logits[:, :-1].float(), -1)
        loss = ((s.exp() * (s - t)).sum(-1) * mask).sum() / mask.sum()
        metrics = {"reverse_kl": float(loss.detach())}
    else:
        lp, mask = response_logprobs(student, batch)
        teacher_lp = batch["teacher_logprobs"][:, 1:]
        if trial.adv == "pos":  # where the student is above the teacher, set the teacher equal: zero advantage
            teacher_lp = torch.maximum(teacher_lp, lp.detach())
        if trial.adv == "fresh":
            stale = lp.detach() < batch["ref_logprobs"][:, 1:] - 1
            teacher_lp = torch.where(stale, torch.maximum(teacher_lp, lp.detach()), teacher_lp)
        if trial.adv == "center":
            loss, metrics = centered_opd_loss(lp, teacher_lp, mask, trial.tau)
        elif trial.adv == "is":
            weight = torch.clamp(torch.exp(lp.detach() - batch["ref_logprobs"][:, 1:]), max=1.0)
            loss, metrics = opd_loss(lp, teacher_lp, mask * weight, trial.tau, n_loss_tokens=mask.sum())
        else:
            loss, metrics = opd_loss(lp, teacher_lp, mask, trial.tau)
        rejected = (batch["teacher_logprobs"][:, 1:] - lp.detach() < -1) & mask.bool()
        # the student's mean log-prob of the tokens the teacher rejects (teacher < student - 1 nat)
        metrics["rejected_lp"] = float(lp.detach()[rejected].mean()) if rejected.any() else float("nan")
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    return metrics


def traced(trial: Trial, trace, student, done: int, steps: int) -> None:
    if trial.trace and done % trial.trace == 0 and done < steps:
        trace(student, done)
        student.train()


def run(trial: Trial, experiment: Path, teacher, tokenizer, prompts, task: TaskParams, pad, stop,
        trace: Callable[[torch.nn.Module, int], None], held_out: set[str]) -> tuple[torch.nn.Module, dict]:
    teacher = scaled(teacher, trial.teacher_t, experiment / "models/teacher-A")
    torch.manual_seed(trial.seed)
    student = load_model(experiment / "models/sft-A").train()
    if trial.embed == "freeze":
        student.get_input_embeddings().weight.requires_grad_(False)
    elif trial.embed == "untie":
        student.config.tie_word_embeddings = False
        student.lm_head.weight = torch.nn.Parameter(student.get_input_embeddings().weight.detach().clone())
    trained = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=trial.lr, betas=(0.9, 0.98), weight_decay=0.1)
    prompts = more_prompts(tokenizer, prompts, trial.prompts, task, held_out,
                           exclude=trial.held_out == "exclude")[:trial.prompts]
    rng = random.Random(trial.seed)
    sequences = len(prompts) * (1 if trial.method == "standard" else trial.n)
    steps = max(1, round(trial.epochs * sequences / trial.batch))
    kls = []
    if trial.method == "standard":
        per_step = trial.batch
        order: list[int] = []
        for s in range(steps):
            if len(order) < per_step:
                order += rng.sample(range(len(prompts)), len(prompts))
            chosen, order = order[:per_step], order[per_step:]
            batch = scored_rollouts(student, teacher, [prompts[i] for i in chosen], trial,
                                    trial.seed * 100_003 + s, stop, pad)
            kls.append(step(student, teacher, optimizer, batch, trial, False))
            traced(trial, trace, student, s + 1, steps)
    else:
        share = -(-len(prompts) // trial.rounds)
        sampler = student if trial.round_policy == "student" else load_model(experiment / "models/sft-A").eval()
        order = []
        per_round = steps // trial.rounds
        if per_round == 0:
            raise SystemExit(f"rounds={trial.rounds} is more than the trial's {steps} steps: lower rounds")
        for s in range(steps):
            if s % per_round == 0 and s // per_round < trial.rounds:
                part = prompts[s // per_round * share:][:share]
                data = scored_rollouts(sampler, teacher, part, trial, trial.seed + 1 + s, stop, pad)
                sequences, order = len(part) * trial.n, []
            if len(order) < trial.batch:
                order += rng.sample(range(sequences), sequences)
            chosen, order = order[:trial.batch], order[trial.batch:]
            index = torch.tensor(chosen)
            batch = rows(data, index)
            width = int(batch["attention_mask"].sum(1).max())  # right padding: drop the all-pad columns
            batch = {k: v[:, :width] for k, v in batch.items()}
            kls.append(step(student, teacher, optimizer, batch, trial, trial.method == "exact"))
            traced(trial, trace, student, s + 1, steps)
    last = kls[-3:]
    return student, {"steps": steps, "kl_first": kls[0]["reverse_kl"],
                     "kl_last": sum(m["reverse_kl"] for m in last) / len(last),
                     "rej_first": kls[0].get("rejected_lp", float("nan")),
                     "rej_last": sum(m.get("rejected_lp", float("nan")) for m in last) / len(last)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("trials", nargs="*", help="key=value,... changes from the defaults, one trial each")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--reference", action="store_true", help="also print pi_ref's and the teacher's avg@k")
    args = parser.parse_intermixed_args()  # --reference before, between or after the trials
    trials = [(text, Trial.parse(text)) for text in args.trials or [""]]  # every trial checked before any runs
    # the trials build their batches where tensors are created by default: there, on the models' device
    torch.set_default_device(pick_device())
    tokenizer = load_tokenizer(args.experiment / "models/sft-A")
    pad = PadCollator(tokenizer.pad_token_id)
    teacher = load_model(args.experiment / "models/teacher-A").eval()
    stop = stop_token_ids(teacher, tokenizer)
    opd, provenance = read_table(args.experiment / "data/opd.parquet", TASK_SCHEMA)
    # the experiment's task: more prompts come from task_data's draw of it
    task = recorded_task(args.experiment / "data/opd.parquet", provenance)
    prompts = [prompt_ids(tokenizer, p) for p in opd.column("problem").to_pylist()]
    tasks = read_table(args.experiment / "data/eval.parquet", TASK_SCHEMA)[0]
    problems, answers = tasks.column("problem").to_pylist(), tasks.column("answer").to_pylist()
    held_out = set(problems)
    print(f"defaults: {Trial()}")
    if args.reference:
        for name in ("sft-A", "teacher-A"):
            model = load_model(args.experiment / "models" / name)
            accuracy, errors = avg_at_k(model, tokenizer, problems, answers, args.k)
            print(f"{name:<60} avg@{args.k} = {accuracy:.4f}, wrong answers: {dict(errors)}")
    print(f"{'trial':<60} {'steps':>5} {'kl_first':>8} {'kl_last':>8} {'rej_first':>9} {'rej_last':>8} "
          f"{'avg@' + str(args.k):>7} {'arith':>5} {'struct':>6} {'unbox':>5} {'s':>5}")
    for text, trial in trials:
        start = time.time()
        def trace(model, done: int, text=text) -> None:
            accuracy, errors = avg_at_k(model, tokenizer, problems, answers, args.k)
            print(f"  {text or 'defaults'} after step {done}: avg@{args.k} = {accuracy:.4f}, "
                  f"wrong answers: {dict(errors)}", flush=True)

        model, info = run(trial, args.experiment, teacher, tokenizer, prompts, task, pad, stop, trace, held_out)
        accuracy, errors = avg_at_k(model, tokenizer, problems, answers, args.k)
        print(f"{text or 'defaults':<60} {info['steps']:>5} {info['kl_first']:>8.3f} {info['kl_last']:>8.3f} "
              f"{info['rej_first']:>9.2f} {info['rej_last']:>8.2f} {accuracy:>7.4f} {errors['arithmetic']:>5} "
              f"{errors['structure']:>6} {errors['unboxed']:>5} {time.time() - start:>5.0f}", flush=True)


if __name__ == "__main__":
    main()
