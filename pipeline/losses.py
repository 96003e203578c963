"""Distillation losses on sparse teacher targets: pure functions, formulas and sources in the docstrings.

Every sparse target is turned into a distribution over B "buckets" per position:
  top-k:    the k stored ids, plus a ghost bucket holding the rest of the vocabulary (teacher mass 1 - sum of the
            top-k probabilities; student mass 1 - its probability on those ids). With k = V the ghost bucket is empty
            and every divergence equals its dense form.
  sampled:  the unique drawn ids with teacher mass counts / N (unbiased, Anshumann et al. 2025), plus the ghost
            bucket with teacher mass 0.
The student's log-probabilities come from a log-softmax over its full vocabulary, gathered at the bucket ids, so
no (batch, length, vocab) teacher tensor ever exists. Divergences are then computed on (N, B) tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSSES = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd", "akl")
TAILS = ("ghost", "renorm", "label")
_TINY = 1e-10


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for the arithmetic; fp32 and fp64 stay as they are (fp64 for gradcheck)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012).

    x is kept below -1e-12 so that the branch torch.where does not take never holds log(0): its infinite
    derivative times a zero upstream gradient would be NaN. The ghost bucket then holds >= 1e-12, not 0.
    """
    x = x.clamp(max=-1e-12)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def next_token_labels(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) int64 ground-truth next tokens at the target positions: position t predicts token t+1.

    input_ids: (B, L); mask: (B, L) bool, never True at the last position (which has no next token).
    """
    return torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)[mask].long()


def bucket_logprobs(student_logp: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Student log-probs on the buckets: gathered ids, then the ghost bucket (everything else).

    Args:
        student_logp: (N, V) float32 log-softmax of the student.
        ids: (N, K) int64 bucket ids; entries where `valid` is False are ignored.
        valid: (N, K) bool.
    Returns:
        (N, K + 1) float32; invalid buckets hold -inf.
    """
    gathered = student_logp.gather(-1, ids.clamp(0, student_logp.shape[-1] - 1))
    gathered = gathered.masked_fill(~valid, float("-inf"))  # (N, K)
    ghost = _log1mexp(torch.logsumexp(gathered, dim=-1, keepdim=True))  # (N, 1)
    return torch.cat([gathered, ghost], dim=-1)


def topk_target(logprobs: torch.Tensor, tail: str = "ghost", label_slot: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher bucket probabilities from stored top-k log-probs.

    Args:
        logprobs: (N, k) teacher log-probs (fp16 as stored is fine), -inf where padded.
        tail: "ghost" keeps the tail mass 1 - sum(top-k) in the ghost bucket (unbiased about what the teacher left
            out); "renorm" rescales the top-k to sum to 1 (the classic, biased: Anshumann et al. 2025 show it can
            train worse than no distillation); "label" adds the tail mass to the ground-truth token's bucket.
        label_slot: (N,) int64, for "label": the bucket of the ground-truth token (k = the ghost bucket when the
            label is not among the top-k).
    Returns:
        (N, k + 1) float32 teacher probabilities; rows sum to 1.
    """
    p = _wide(logprobs).exp()  # (N, k)
    mass = p.sum(-1, keepdim=True).clamp(max=1.0)
    if tail == "renorm":
        return torch.cat([p / mass.clamp(min=_TINY), torch.zeros_like(mass)], dim=-1)
    target = torch.cat([p, 1.0 - mass], dim=-1)  # (N, k + 1)
    if tail == "label":
        tail_mass = target[:, -1:].clone()
        target[:, -1:] = 0.0
        target.scatter_add_(-1, label_slot[:, None], tail_mass)
    return target


def divergence(p: torch.Tensor, log_q: torch.Tensor, loss: str, beta: float = 0.5, alpha: float = 0.1,
               mu: float = 0.5) -> torch.Tensor:
    """D(teacher p || student q) per position over buckets.

    Args:
        p: (N, B) teacher probabilities (rows sum to 1; zeros allowed).
        log_q: (N, B) student log-probabilities (rows logsumexp to 0; -inf allowed where p is 0).
        loss: one of LOSSES:
            fkl   forward KL, sum p log(p/q) (Hinton et al. 2015).
            rkl   reverse KL, sum q log(q/p) (MiniLLM, Gu et al. 2024); p is floored at 1e-10 where it is 0.
            skl   skew KL, KL(p || a p + (1-a) q), a = alpha (DistiLLM, Ko et al. 2024).
            srkl  skew reverse KL, KL(q || (1-a) p + a q) (DistiLLM).
            jsd   generalised JSD with beta, as TRL's GKDTrainer computes it: mixture m = beta p + (1-beta) q in
                  log space with logsumexp, beta KL(p||m) + (1-beta) KL(q||m); beta=0 is forward KL, beta=1 is
                  reverse KL (Agarwal et al. 2024).
            tvd   total variation, 0.5 sum |p - q| (Wen et al. 2023).
            akl   adaptive KL (Wu et al. 2024): g_head FKL + g_tail RKL, the head being the buckets holding the
                  top mu of the teacher's mass and g the share of |p - q| in the head and the tail.
    Returns:
        (N,) float32.
    """
    log_p = torch.log(p.clamp(min=_TINY))
    q = log_q.exp()
    safe_log_q = log_q.clamp(min=-1e4)

    def kl(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)

    if loss == "fkl":
        return kl(p, log_p, safe_log_q)
    if loss == "rkl":
        return kl(q, safe_log_q, log_p)
    if loss == "skl":
        log_m = torch.log((alpha * p + (1 - alpha) * q).clamp(min=_TINY))
        return kl(p, log_p, log_m)
    if loss == "srkl":
        log_m = torch.log(((1 - alpha) * p + alpha * q).clamp(min=_TINY))
        return kl(q, safe_log_q, log_m)
    if loss == "jsd":
        if beta == 0:
            return kl(p, log_p, safe_log_q)
        if beta == 1:
            return kl(q, safe_log_q, log_p)
        log_m = torch.logsumexp(torch.stack([safe_log_q + math.log(1 - beta), log_p + math.log(beta)]), dim=0)
        return beta * kl(p, log_p, log_m) + (1 - beta) * kl(q, safe_log_q, log_m)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if loss == "akl":
        order = torch.argsort(p, dim=-1, descending=True)
        p_sorted = p.gather(-1, order)
        before = torch.cumsum(p_sorted, -1) - p_sorted  # mass strictly above each bucket
        head = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, before < mu)
        gap = (p - q).abs()
        g_head = (gap * head).sum(-1)
        g_tail = (gap * ~head).sum(-1)
        w = g_head / (g_head + g_tail).clamp(min=_TINY)
        return w * kl(p, log_p, safe_log_q) + (1 - w) * kl(q, safe_log_q, log_p)
    raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def distill_loss(
    student_logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    ce_weight: float = 0.5,
    loss: str = "fkl",
    tail: str = "ghost",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ce_weight * CE(ground truth) + (1 - ce_weight) * D(teacher || student), averaged over target tokens.

    Args:
        student_logits: (B, L, V) logits; position t predicts token t+1.
        batch: from `CacheReader.read_padded`, as tensors on the student's device: input_ids (B, L),
            target_mask (B, L), and topk_ids / topk_logprobs (B, L, k) or sample_n (B, L) with flat
            sample_ids / sample_counts (S,). Without teacher keys, the loss is CE alone (evaluation).
        temperature: divides the student's logits for the divergence; the divergence is scaled by T^2 so gradients
            keep their size (Hinton et al. 2015). The stored teacher distribution is at temperature 1.
    Returns:
        (loss, parts): a scalar, and {"ce", "kd", "tokens"} detached, for logging. An all-masked batch gives 0.
    """
    mask = batch["target_mask"].bool()  # (B, L)
    n_tok = mask.sum()
    denom = n_tok.clamp(min=1).float()
    logits = _wide(student_logits[mask])  # (N, V): target positions only
    labels = next_token_labels(batch["input_ids"], mask)  # (N,)
    has_teacher = "topk_ids" in batch or "sample_ids" in batch
    if ce_weight >= 1.0 or not has_teacher:
        ce = F.cross_entropy(logits, labels, reduction="sum") / denom if logits.numel() else logits.sum()
        return ce, {"ce": ce.detach(), "kd": torch.zeros_like(ce.detach()), "tokens": n_tok}

    # One log-softmax over the vocabulary serves both terms (at temperature 1): it is the costliest op here.
    log_p = F.log_softmax(logits, dim=-1)  # (N, V)
    ce = -log_p.gather(-1, labels[:, None]).sum() / denom
    log_q_full = log_p if temperature == 1.0 else F.log_softmax(logits / temperature, dim=-1)  # (N, V)
    if "topk_ids" in batch:
        ids = batch["topk_ids"][mask].long()  # (N, k)
        lps = batch["topk_logprobs"][mask]  # (N, k)
        valid = torch.isfinite(lps) & (ids < logits.shape[-1])
        lps = _wide(lps).to(logits.dtype).masked_fill(~valid, float("-inf"))
        slot = None
        if tail == "label":
            hit = (ids == labels[:, None]) & valid
            slot = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(labels, ids.shape[-1]))
        p = topk_target(lps, tail, slot)  # (N, k + 1)
        log_q = bucket_logprobs(log_q_full, ids, valid)
        if tail == "renorm":  # both sides renormalised over the top-k ids
            log_q = torch.cat([log_q[:, :-1] - torch.logsumexp(log_q[:, :-1], -1, keepdim=True),
                               torch.full_like(log_q[:, -1:], float("-inf"))], dim=-1)
        elif tail == "label":  # the label's bucket, when outside the top-k, is the label itself, not the whole tail
            outside = slot == ids.shape[-1]
            log_q = log_q.clone()
            log_q[outside, -1] = log_q_full[outside, labels[outside]]
    else:
        ids, p, valid = _sample_buckets(batch, mask)
        p = p.to(logits.dtype)
        valid = valid & (ids < logits.shape[-1])
        log_q = bucket_logprobs(log_q_full, ids, valid)
        p = torch.cat([p, torch.zeros_like(p[:, :1])], dim=-1)
    kd = divergence(p, log_q, loss, beta=beta).sum() * temperature**2 / denom
    total = ce_weight * ce + (1 - ce_weight) * kd
    return total, {"ce": ce.detach(), "kd": kd.detach(), "tokens": n_tok}


def _sample_buckets(batch: dict[str, torch.Tensor], mask: torch.Tensor):
    """Padded (N, U) ids, probabilities counts / N and validity at the target positions of a sampled batch."""
    n = batch["sample_n"].long()  # (B, L)
    flat_n = n.reshape(-1)
    pos = torch.repeat_interleave(torch.arange(flat_n.numel(), device=n.device), flat_n)  # (S,) position of each id
    starts = torch.cumsum(flat_n, 0) - flat_n
    slot = torch.arange(pos.numel(), device=n.device) - starts[pos]  # (S,) index within its position
    U = max(int(flat_n.max()) if flat_n.numel() else 1, 1)
    counts = batch["sample_counts"].double()
    draws = torch.zeros(flat_n.numel(), device=n.device, dtype=torch.float64).index_add_(0, pos, counts)  # N
    ids = torch.zeros(flat_n.numel(), U, dtype=torch.long, device=n.device)
    prob = torch.zeros(flat_n.numel(), U, device=n.device, dtype=torch.float64)
    ids[pos, slot] = batch["sample_ids"].long()
    prob[pos, slot] = counts / draws[pos]
    keep = mask.reshape(-1)
    ids, prob = ids[keep], prob[keep]  # (N, U)
    return ids, prob, prob > 0
