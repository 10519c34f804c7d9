"""The OPD objective shared by Lightning (offline) and standard (online) OPD.

Per response token, the advantage is the teacher-student log-ratio,
``A_t = clip(log pi_T(y_t) - log pi_theta(y_t), -tau, tau)`` with a stop
gradient, and the loss is the policy gradient ``-mean_t A_t log pi_theta(y_t)``
(mean over all response tokens of the batch). Its gradient is
``-mean_t A_t grad log pi_theta(y_t)``: it raises tokens the teacher likes more
than the student does and lowers the others.

With a top-k teacher cache, `topk_kl_loss` replaces the one sampled token by
the teacher's k most likely tokens plus one bin for the rest, and minimises
the exact reverse (or forward) KL over those k + 1 bins.
"""
from __future__ import annotations

import torch


def opd_loss(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor,
             tau: float | None = None, n_loss_tokens: torch.Tensor | int | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """``student_logprobs`` carries the gradient; the other two are constants.
    All three are (batch, tokens); ``mask`` is 1 on response tokens. The loss
    is divided by ``n_loss_tokens`` (default: the response tokens here), the
    metrics are means over this batch."""
    mask = mask.to(student_logprobs.dtype)
    n_tokens = mask.sum().clamp(min=1.0)
    log_ratio = teacher_logprobs - student_logprobs.detach()
    advantage = log_ratio if tau is None else log_ratio.clamp(-tau, tau)
    loss = -(advantage * student_logprobs * mask).sum() / (n_tokens if n_loss_tokens is None else n_loss_tokens)
    with torch.no_grad():
        clipped = ((log_ratio.abs() > tau).to(mask.dtype) * mask).sum() / n_tokens if tau is not None else 0.0
        metrics = {
            # the sample estimate of KL(pi_theta || pi_T) per token; exact in expectation when
            # the tokens were sampled from pi_theta (standard OPD, or Lightning OPD at step 0)
            "reverse_kl": float((-log_ratio * mask).sum() / n_tokens),
            "advantage": float((advantage * mask).sum() / n_tokens),
            "teacher_logprob": float((teacher_logprobs * mask).sum() / n_tokens),
            "student_logprob": float((student_logprobs.detach() * mask).sum() / n_tokens),
            "clip_fraction": float(clipped),
        }
    return loss, metrics


LOSSES = ("sampled", "topk_reverse_kl", "topk_forward_kl")
# floor of the teacher's remaining mass 1 - sum exp(top-k): the stored (rounded) top-k log-probs
# may sum to 1 when the true remainder is tiny, and log 0 would make the reverse KL infinite
TEACHER_REST_FLOOR = 1e-6


def topk_kl_loss(student_support: torch.Tensor, student_rest: torch.Tensor, teacher_support: torch.Tensor,
                 mask: torch.Tensor, direction: str, n_loss_tokens: torch.Tensor | int | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """The KL between student and teacher over k + 1 bins at every response
    position: the teacher's k most likely tokens, and one bin for all other
    tokens (the student's mass there, ``exp(student_rest)``, against the
    teacher's remaining mass ``1 - sum exp(teacher_support)``). ``direction``
    "reverse": KL(pi_theta || pi_T) (what OPD minimises), "forward":
    KL(pi_T || pi_theta). ``student_support`` (batch, tokens, k) and
    ``student_rest`` (batch, tokens; -inf: the k tokens are the whole
    vocabulary, no remaining bin) carry the gradient; the loss is their exact
    gradient over the bins, no sampling. Divided by ``n_loss_tokens`` (default:
    the response tokens here); the metrics are means over this batch."""
    if direction not in ("reverse", "forward"):
        raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")
    keep = mask.bool()
    s, t = student_support[keep], teacher_support[keep].float()  # (n, k)
    has_rest = torch.isfinite(student_rest[keep])
    s_rest_log = torch.where(has_rest, student_rest[keep], 0.0)
    s_rest = s_rest_log.exp() * has_rest
    t_rest = torch.where(has_rest, (1 - t.exp().sum(-1)).clamp(min=0.0), 0.0)
    t_rest_log = t_rest.clamp(min=TEACHER_REST_FLOOR).log()
    if direction == "reverse":
        kl = (s.exp() * (s - t)).sum(-1) + s_rest * (s_rest_log - t_rest_log)
    else:
        kl = (t.exp() * (t - s)).sum(-1) + t_rest * (t_rest_log - s_rest_log)
    n_tokens = keep.sum().clamp(min=1)
    loss = kl.sum() / (n_tokens if n_loss_tokens is None else n_loss_tokens)
    with torch.no_grad():
        metrics = {
            f"topk_{direction}_kl": float(kl.sum() / n_tokens),
            "teacher_topk_mass": float(t.exp().sum(-1).sum() / n_tokens),
            "student_topk_mass": float(s.exp().sum(-1).sum() / n_tokens),
        }
    return loss, metrics
