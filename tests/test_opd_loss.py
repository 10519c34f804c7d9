import math

import pytest
import torch

from lightning_opd.opd_loss import opd_loss


def hand_loss(student, teacher, mask, tau):
    """-mean over masked tokens of clip(t - s, -tau, tau) * s, written out by hand."""
    total, count = 0.0, 0
    for s_row, t_row, m_row in zip(student, teacher, mask):
        for s, t, m in zip(s_row, t_row, m_row):
            if m:
                a = t - s
                if tau is not None:
                    a = max(-tau, min(tau, a))
                total += -a * s
                count += 1
    return total / count


STUDENT = [[-0.5, -2.0, -0.1], [-1.0, -0.2, -3.0]]
TEACHER = [[-0.1, -6.0, -0.3], [-0.4, -0.2, -0.5]]
MASK = [[1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize("tau", [None, 1.0, 0.3])
def test_loss_matches_hand_computation(tau):
    student = torch.tensor(STUDENT, requires_grad=True)
    loss, metrics = opd_loss(student, torch.tensor(TEACHER), torch.tensor(MASK), tau)
    assert loss.item() == pytest.approx(hand_loss(STUDENT, TEACHER, MASK, tau), rel=1e-6)
    # reverse KL estimate: mean over tokens of s - t
    kl = sum(s - t for sr, tr, mr in zip(STUDENT, TEACHER, MASK) for s, t, m in zip(sr, tr, mr) if m) / 5
    assert metrics["reverse_kl"] == pytest.approx(kl, rel=1e-6)


def test_gradient_is_minus_advantage_over_token_count():
    """The advantage is a constant: d loss / d s_t = -A_t / n for masked tokens, 0 elsewhere."""
    tau = 1.0
    student = torch.tensor(STUDENT, requires_grad=True)
    loss, _ = opd_loss(student, torch.tensor(TEACHER), torch.tensor(MASK), tau)
    loss.backward()
    for i in range(2):
        for j in range(3):
            advantage = max(-tau, min(tau, TEACHER[i][j] - STUDENT[i][j]))
            expected = -advantage / 5 if MASK[i][j] else 0.0
            assert student.grad[i, j].item() == pytest.approx(expected, abs=1e-7)


def test_clip_fraction_counts_clipped_tokens():
    _, metrics = opd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(MASK), tau=1.0)
    # |t - s| > 1 at (0,1): 4.0 and (1,2): 2.5 -> 2 of 5 masked tokens
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)
    _, unclipped = opd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(MASK), tau=None)
    assert unclipped["clip_fraction"] == 0.0


def test_loss_is_zero_when_student_equals_teacher():
    logprobs = torch.tensor(STUDENT)
    loss, metrics = opd_loss(logprobs.clone().requires_grad_(), logprobs, torch.tensor(MASK))
    assert loss.item() == 0.0
    assert metrics["reverse_kl"] == 0.0
    assert not math.isnan(metrics["advantage"])
