"""`kdcache eval`: perplexity on held-out text, and KL from the teacher where a cache of that text is given."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.collate import to_tensors
from pipeline.losses import bucket_logprobs, divergence, next_token_labels, topk_target
from pipeline.teacher import context_length, load_model, load_tokenizer, resolve_device, resolve_dtype
from pipeline.train import check_vocab, eval_dataset
from storage.reader import CacheReader

ECE_BINS = 15


def _token_ce(logits: torch.Tensor, batch: dict, bins: np.ndarray | None = None) -> tuple[float, int]:
    """Summed CE of next-token prediction at target positions, and their count.

    bins: optional (3, ECE_BINS) accumulator of [count, confidence sum, correct sum] of the top-1 prediction.
    """
    mask = batch["target_mask"].bool()
    labels = next_token_labels(batch["input_ids"], mask)
    logits = logits[mask].float()
    if bins is not None and len(labels):
        conf, pred = torch.softmax(logits, -1).max(-1)
        which = (conf * ECE_BINS).long().clamp(max=ECE_BINS - 1).cpu().numpy()
        np.add.at(bins[0], which, 1)
        np.add.at(bins[1], which, conf.cpu().numpy())
        np.add.at(bins[2], which, (pred == labels).float().cpu().numpy())
    return float(F.cross_entropy(logits, labels, reduction="sum")), int(mask.sum())


def expected_calibration_error(bins: np.ndarray) -> float:
    """ECE of the top-1 prediction (Guo et al. 2017): sum over bins of |accuracy - confidence| weighted by count."""
    count, conf, correct = bins
    return float(np.abs(correct - conf).sum() / max(count.sum(), 1))


def evaluate(model_name: str, data: str | None = None, cache: str | None = None, batch_size: int = 8,
             max_length: int | None = None, limit: int | None = None, device: str = "auto") -> dict:
    """Perplexity of MODEL on DATA and, with a cache, the mean KL(teacher || model) over the cache's positions.

    For top-k caches the KL is over the k ids plus the ghost bucket (a lower bound of the full KL, exact at k = V);
    for sampled caches it is to the empirical distribution of the draws.
    Returns: {"perplexity", "tokens", "ece" (with DATA: calibration of the top-1 prediction), "kl_to_teacher"
    (or None), "cache_tokens"}.
    """
    if data is None and cache is None:
        raise ValueError("give DATA, --cache, or both")
    dev = resolve_device(device)
    model = load_model(model_name, None, resolve_dtype("auto", dev), dev)
    out: dict = {"perplexity": None, "tokens": 0, "kl_to_teacher": None}
    if data is not None:
        tokenizer = load_tokenizer(model_name)
        length = max_length or min(context_length(model.config) or 2048, 2048)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        ce_sum = n = 0
        bins = np.zeros((3, ECE_BINS))
        with torch.inference_mode():
            for batch in eval_dataset(data, tokenizer, length, batch_size, pad, limit):
                batch = {k: v.to(dev) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits
                s, c = _token_ce(logits, batch, bins)
                ce_sum, n = ce_sum + s, n + c
        out.update(perplexity=math.exp(ce_sum / max(n, 1)), tokens=n, ece=expected_calibration_error(bins))
    if cache is not None:
        reader = CacheReader(cache)
        try:
            tokenizer = load_tokenizer(model_name)
        except (OSError, FileNotFoundError):
            tokenizer = None
        check_vocab(reader.manifests[0], model, tokenizer)
        kl_sum = ce_sum = n = 0
        with torch.inference_mode():
            for start in range(0, reader.num_rows, batch_size):
                batch = to_tensors(reader.read_padded(np.arange(start, min(start + batch_size, reader.num_rows))))
                batch = {k: v.to(dev) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"].long(), attention_mask=batch["attention_mask"].long()).logits
                kl, c = _kl_sum(logits, batch)
                s, _ = _token_ce(logits, batch)
                kl_sum, ce_sum, n = kl_sum + kl, ce_sum + s, n + c
        out.update(kl_to_teacher=kl_sum / max(n, 1), cache_tokens=n)
        if data is None:
            out.update(perplexity=math.exp(ce_sum / max(n, 1)), tokens=n)
    return out


def _kl_sum(logits: torch.Tensor, batch: dict) -> tuple[float, int]:
    from pipeline.losses import _sample_buckets

    mask = batch["target_mask"].bool()
    log_q_full = F.log_softmax(logits[mask].float(), dim=-1)
    if "topk_ids" in batch:
        ids = batch["topk_ids"][mask].long()
        lps = batch["topk_logprobs"][mask].float()
        valid = torch.isfinite(lps) & (ids < log_q_full.shape[-1])
        p = topk_target(lps.masked_fill(~valid, float("-inf")))
    else:
        ids, p, valid = _sample_buckets(batch, mask)
        p = torch.cat([p, torch.zeros_like(p[:, :1])], dim=-1)
    log_q = bucket_logprobs(log_q_full, ids, valid)
    return float(divergence(p, log_q, "fkl").sum()), int(mask.sum())
