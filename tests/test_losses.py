"""The sparse losses: dense parity at k = V, gradients, unbiased sampled targets, masks, low precision."""

import numpy as np
import pytest
import torch

from pipeline.losses import LOSSES, distill_loss

V, B, L = 11, 2, 5


def dense_divergence(p, q, loss, beta=0.5, alpha=0.1, mu=0.5):
    """Reference forms over the full vocabulary. p, q: (N, V)."""
    kl = lambda a, b: (a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log())).sum(-1)  # noqa: E731
    if loss == "fkl":
        return kl(p, q)
    if loss == "rkl":
        return kl(q, p)
    if loss == "skl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if loss == "srkl":
        return kl(q, (1 - alpha) * p + alpha * q)
    if loss == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if loss == "akl":
        sp, order = p.sort(-1, descending=True)
        head = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, (sp.cumsum(-1) - sp) < mu)
        gap = (p - q).abs()
        w = (gap * head).sum(-1) / gap.sum(-1)
        return w * kl(p, q) + (1 - w) * kl(q, p)
    raise AssertionError(loss)


def make_batch(dtype=torch.float64, k=V, seed=0, prompt=0):
    g = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(B, L, V, generator=g, dtype=dtype) * 2
    teacher_lp = torch.log_softmax(teacher_logits, -1)
    vals, ids = teacher_lp.topk(k, dim=-1)
    input_ids = torch.randint(0, V, (B, L), generator=g)
    target = torch.ones(B, L, dtype=torch.bool)
    target[:, -1] = False
    target[:, : max(prompt - 1, 0)] = False
    batch = {"input_ids": input_ids, "target_mask": target, "topk_ids": ids, "topk_logprobs": vals}
    return batch, teacher_lp


@pytest.mark.parametrize("loss", LOSSES)
def test_topk_with_k_equal_vocab_equals_dense(loss):
    batch, teacher_lp = make_batch()
    student = torch.randn(B, L, V, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got, _ = distill_loss(student, batch, ce_weight=0.0, loss=loss)
    mask = batch["target_mask"]
    want = dense_divergence(teacher_lp[mask].exp(), torch.softmax(student[mask], -1), loss).mean()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_ends_are_forward_and_reverse_kl(beta):
    batch, _ = make_batch()
    student = torch.randn(B, L, V, dtype=torch.float64)
    jsd, _ = distill_loss(student, batch, ce_weight=0.0, loss="jsd", beta=beta)
    ref, _ = distill_loss(student, batch, ce_weight=0.0, loss="fkl" if beta == 0 else "rkl")
    torch.testing.assert_close(jsd, ref)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("tail", ["ghost", "renorm", "label"])
def test_gradients_match_finite_differences(loss, tail):
    batch, _ = make_batch(k=4)
    student = torch.randn(B, L, V, dtype=torch.float64, requires_grad=True)
    fn = lambda s: distill_loss(s, batch, ce_weight=0.3, loss=loss, tail=tail, temperature=1.5)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-5)


def test_ghost_tail_differs_from_renorm_and_is_exact_where_renorm_is_biased():
    batch, teacher_lp = make_batch(k=3)
    student = torch.log_softmax(teacher_lp.clone(), -1)  # the student equals the teacher
    ghost, _ = distill_loss(student, batch, ce_weight=0.0, tail="ghost")
    renorm, _ = distill_loss(student, batch, ce_weight=0.0, tail="renorm")
    assert ghost.abs() < 1e-9  # a perfect student pays nothing
    # renormalising both sides also gives 0 here, but its gradient at the perfect student is not zero for fkl
    # on the full distribution: check the ghost gradient vanishes there
    s = student.clone().requires_grad_(True)
    distill_loss(s, batch, ce_weight=0.0, tail="ghost")[0].backward()
    assert s.grad.abs().max() < 1e-9
    assert renorm >= 0


def sampled_batch(teacher_lp, draws, g):
    """A sample-mode batch drawn from teacher_lp (B, L, V), in the layout `read_padded` produces."""
    probs = teacher_lp.exp().reshape(-1, V)
    picked = torch.multinomial(probs, draws, replacement=True, generator=g)
    n, ids, counts = [], [], []
    for row in picked:
        u, c = torch.unique(row, return_counts=True)
        n.append(len(u))
        ids.append(u)
        counts.append(c)
    return {"sample_n": torch.tensor(n, dtype=torch.uint8).reshape(B, L), "sample_ids": torch.cat(ids).to(torch.int32),
            "sample_counts": torch.cat(counts).to(torch.uint8)}


def test_sampled_targets_average_to_the_dense_gradient():
    batch, teacher_lp = make_batch()
    student = torch.randn(B, L, V, dtype=torch.float64)
    s = student.clone().requires_grad_(True)
    distill_loss(s, batch, ce_weight=0.0, loss="fkl")[0].backward()  # k = V: the dense gradient
    dense = s.grad.clone()
    g = torch.Generator().manual_seed(0)
    total = torch.zeros_like(student)
    trials = 400
    for _ in range(trials):
        sb = {"input_ids": batch["input_ids"], "target_mask": batch["target_mask"], **sampled_batch(teacher_lp, 8, g)}
        s = student.clone().requires_grad_(True)
        distill_loss(s, sb, ce_weight=0.0, loss="fkl")[0].backward()
        total += s.grad
    mean = total / trials
    # each gradient entry is q - counts/N: its mean converges to q - p at rate 1/sqrt(trials * N)
    assert (mean - dense).abs().max() < 4 * 0.5 / np.sqrt(trials * 8) / batch["target_mask"].sum()
    assert (mean - dense).abs().max() < (dense.abs().max() / 5)


def test_masked_positions_do_not_count():
    batch, _ = make_batch(k=4, prompt=3)
    student = torch.randn(B, L, V, dtype=torch.float64)
    base, parts = distill_loss(student, batch, loss="fkl")
    assert int(parts["tokens"]) == int(batch["target_mask"].sum())
    changed = {**batch, "topk_logprobs": batch["topk_logprobs"].clone(), "topk_ids": batch["topk_ids"].clone()}
    changed["topk_logprobs"][~batch["target_mask"]] = -0.1
    changed["topk_ids"][~batch["target_mask"]] = 0
    torch.testing.assert_close(distill_loss(student, changed, loss="fkl")[0], base)


def test_all_masked_batch_gives_zero_not_nan():
    batch, _ = make_batch(k=4)
    batch["target_mask"][:] = False
    student = torch.randn(B, L, V, requires_grad=True)
    loss, _ = distill_loss(student, batch, loss="fkl")
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    batch, _ = make_batch(dtype=torch.float32, k=4)
    student = torch.randn(B, L, V)
    ref, _ = distill_loss(student, batch, loss="fkl")
    low = {**batch, "topk_logprobs": batch["topk_logprobs"].to(torch.float16)}
    got, _ = distill_loss(student.to(dtype), low, loss="fkl")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


def test_ce_weight_one_is_plain_cross_entropy():
    batch, _ = make_batch(k=4)
    student = torch.randn(B, L, V)
    loss, _ = distill_loss(student, batch, ce_weight=1.0)
    mask = batch["target_mask"]
    labels = torch.cat([batch["input_ids"][:, 1:], batch["input_ids"][:, :1]], 1)
    want = torch.nn.functional.cross_entropy(student[mask], labels[mask])
    torch.testing.assert_close(loss, want)
