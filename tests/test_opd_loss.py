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


# ---- the top-k losses: KL over the teacher's k tokens plus one bin for the rest
from lightning_opd.logprobs import response_support_logprobs  # noqa: E402
from lightning_opd.opd_loss import TEACHER_REST_FLOOR, topk_kl_loss  # noqa: E402

# one response position, a 5-token vocabulary, the teacher's top 2 are tokens 3 and 0
LOGITS = [1.0, -0.5, 0.2, 2.0, -1.0]
TEACHER_TOP = [(3, -0.3), (0, -1.6)]


def binned_kl_by_hand(direction):
    z = sum(math.exp(x) for x in LOGITS)
    p = [math.exp(x) / z for x in LOGITS]
    student = [p[i] for i, _ in TEACHER_TOP] + [1 - sum(p[i] for i, _ in TEACHER_TOP)]
    teacher = [math.exp(lp) for _, lp in TEACHER_TOP]
    teacher.append(max(1 - sum(teacher), TEACHER_REST_FLOOR))
    a, b = (student, teacher) if direction == "reverse" else (teacher, student)
    return sum(x * math.log(x / y) for x, y in zip(a, b))


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_topk_loss_matches_hand_computation(direction):
    logits = torch.tensor([LOGITS], requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    ids = torch.tensor([[i for i, _ in TEACHER_TOP]])
    support = logp.gather(-1, ids)
    rest = logp.masked_fill(torch.zeros(5, dtype=torch.bool).scatter(0, ids[0], True), float("-inf")).logsumexp(-1)
    teacher = torch.tensor([[lp for _, lp in TEACHER_TOP]])
    # two positions, the second masked out with garbage that must not count
    loss, metrics = topk_kl_loss(torch.stack([support, support * 7]), torch.stack([rest, rest]),
                                 torch.stack([teacher, teacher]), torch.tensor([[1], [0]]), direction)
    assert loss.item() == pytest.approx(binned_kl_by_hand(direction), rel=1e-5)
    assert metrics[f"topk_{direction}_kl"] == pytest.approx(binned_kl_by_hand(direction), rel=1e-5)
    loss.backward()
    # d KL / d logits by central differences of the hand computation
    for j in range(5):
        LOGITS[j] += 1e-4
        up = binned_kl_by_hand(direction)
        LOGITS[j] -= 2e-4
        down = binned_kl_by_hand(direction)
        LOGITS[j] += 1e-4
        assert logits.grad[0, j].item() == pytest.approx((up - down) / 2e-4, abs=1e-4)


def test_topk_loss_floors_the_teacher_rest_when_its_top_k_holds_all_mass():
    """Rounded top-k log-probs summing to 1: the rest bin is the floor, and the loss stays finite."""
    teacher = torch.log(torch.tensor([[[0.6, 0.4000001]]]))
    student = torch.log(torch.tensor([[[0.5, 0.3]]])).requires_grad_()
    rest = torch.log(torch.tensor([[0.2]])).requires_grad_()
    loss, _ = topk_kl_loss(student, rest, teacher, torch.ones(1, 1), "reverse")
    expected = 0.5 * math.log(0.5 / 0.6) + 0.3 * math.log(0.3 / 0.4000001) + 0.2 * math.log(0.2 / TEACHER_REST_FLOOR)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all() and torch.isfinite(rest.grad).all()


def tiny_lm(seed):
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=None, eos_token_id=1)
    return AutoModelForCausalLM.from_config(config).double().eval()


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("k", [512, 8])
def test_topk_loss_through_chunked_logprobs_equals_full_vocabulary_kl(direction, k):
    """With k = the vocabulary the k + 1 bins are the vocabulary: the loss and its gradient equal the exact
    per-token KL over all 512 tokens from full logits; with k = 8 they equal the binned KL from full logits."""
    from lightning_opd.training import PadCollator, supervised_example

    student, teacher = tiny_lm(0), tiny_lm(1)
    generator = torch.Generator().manual_seed(0)
    rows = [supervised_example(torch.randint(2, 512, (n,), generator=generator).tolist(),
                               torch.randint(2, 512, (m,), generator=generator).tolist()) for n, m in ((5, 9), (3, 12))]
    batch = PadCollator(0)(rows)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    mask = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        teacher_logp = torch.log_softmax(teacher(**inputs).logits[:, :-1].double(), -1)
    top, ids = teacher_logp.topk(k, dim=-1)

    _, rest, support, got_mask = response_support_logprobs(student, batch, ids, chunk_tokens=4)
    assert torch.equal(got_mask, mask)
    loss, _ = topk_kl_loss(support, rest, top.float(), mask, direction)
    loss.backward()
    chunked_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    s = torch.log_softmax(student(**inputs).logits[:, :-1].double(), -1)
    t = teacher_logp
    if k < 512:  # the k + 1 bins of the full distributions
        in_top = torch.zeros_like(s, dtype=torch.bool).scatter(-1, ids, True)
        s = torch.cat([s.gather(-1, ids), s.masked_fill(in_top, float("-inf")).logsumexp(-1, keepdim=True)], -1)
        t = torch.cat([top, (1 - top.exp().sum(-1, keepdim=True)).clamp(min=TEACHER_REST_FLOOR).log()], -1)
    a, b = (s, t) if direction == "reverse" else (t, s)
    exact = ((a.exp() * (a - b)).sum(-1) * mask).sum() / mask.sum()
    exact.backward()
    assert loss.item() == pytest.approx(exact.item(), abs=1e-5)
    for chunked, full in zip(chunked_grads, (p.grad for p in student.parameters())):
        torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-4)
