"""The OPD objective shared by Lightning (offline) and standard (online) OPD.

Per response token, the advantage is the teacher-student log-ratio,
``A_t = clip(log pi_T(y_t) - log pi_theta(y_t), -tau, tau)`` with a stop
gradient, and the loss is the policy gradient ``-mean_t A_t log pi_theta(y_t)``
(mean over all response tokens of the batch). Its gradient is
``-mean_t A_t grad log pi_theta(y_t)``: it raises tokens the teacher likes more
than the student does and lowers the others.
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
