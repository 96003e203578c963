"""Training-step benchmark: what distilling from a cache costs over plain CE, and what it saves over a live teacher.

    python benchmarks/bench_train.py [--quick] [--json PATH] [--device cuda]

A tiny GPT-2 student (vocabulary 50,257) takes the same batches (8 rows of ~256 tokens; --quick: 4 of ~128)
four ways:
  (a) CE only, from the cache's tokens;         (b) KD from a sampled cache (N = 50);
  (c) KD from a top-k 64 cache;                 (d) online KD: a GPT-2-small-shaped teacher forward every step,
                                                    dense forward KL over the full vocabulary.
Each step is the body of `KDTrainer.compute_loss` plus backward and AdamW: data read (CacheBatches, timed apart
as data wait), student forward, `distill_loss`, backward, optimizer step. The caches are synthetic rows shaped
like a real capture (the step time depends on shapes, not values). Everything runs in this one process, the four
alternating, each one's best of `--repeats` kept. Ratios:
  kd_vs_ce_step (b / a, target <= 1.10), topk_vs_ce_step (c / a), cache_vs_online (d / b, at least 2),
  data_wait_share (data read time / step time, target under 5%).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_storage import VOCAB, build_cache  # noqa: E402

from pipeline.losses import distill_loss, next_token_labels  # noqa: E402
from pipeline.train_data import CacheBatches  # noqa: E402
from storage.format import CacheHeader  # noqa: E402


def step_time(student, opt, data: CacheBatches, steps: int, device, mode: str, teacher=None) -> tuple[float, float]:
    """Mean seconds per step and mean seconds of data read per step, over `steps` batches."""
    total = wait = 0.0
    for i in range(steps):
        t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in data[i % len(data)].items()}
        t1 = time.perf_counter()
        logits = student(input_ids=batch["input_ids"].long(), attention_mask=batch["attention_mask"].long()).logits
        if mode == "ce":
            loss, _ = distill_loss(logits, batch, ce_weight=1.0)
        elif mode == "online":
            with torch.inference_mode():
                t_logits = teacher(input_ids=batch["input_ids"].long(),
                                   attention_mask=batch["attention_mask"].long()).logits
                mask = batch["target_mask"].bool()
                t_logp = F.log_softmax(t_logits[mask].float(), -1)
            t_logp = t_logp.clone()
            s_all = logits[mask].float()
            labels = next_token_labels(batch["input_ids"], mask)
            ce = F.cross_entropy(s_all, labels)
            kd = F.kl_div(F.log_softmax(s_all, -1), t_logp, log_target=True, reduction="batchmean")
            loss = 0.5 * ce + 0.5 * kd
        else:
            loss, _ = distill_loss(logits, batch, ce_weight=0.5, loss="fkl")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        total += time.perf_counter() - t0
        wait += t1 - t0
    return total / steps, wait / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(os.cpu_count() or 1, 2))
    steps, rows, mean_len = (4, 4, 128) if args.quick else (12, 8, 256)
    torch.manual_seed(0)
    student_cfg = GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=128, n_head=4, n_positions=1024)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB)).to(device).eval()
    results: dict = {"device": str(device), "steps": steps, "batch_rows": rows, "mean_len": mean_len}
    with tempfile.TemporaryDirectory() as tmp:
        data = {}
        for name, header in (("topk", CacheHeader(mode="topk", vocab_size=VOCAB, k=64, teacher={"id": "s"})),
                             ("sample", CacheHeader(mode="sample", vocab_size=VOCAB, draws=50, teacher={"id": "s"}))):
            build_cache(os.path.join(tmp, name), header, n_shards=1, rows_per_shard=rows * steps, mean_len=mean_len)
            data[name] = CacheBatches([(os.path.join(tmp, name), None)], batch_size=rows, seed=0)
        runs = {"ce": ("topk", None), "sample": ("sample", None), "topk": ("topk", None), "online": ("topk", teacher)}
        best = {k: (float("inf"), 0.0) for k in runs}
        for _ in range(args.repeats):
            for mode, (cache, t) in runs.items():
                torch.manual_seed(0)
                student = GPT2LMHeadModel(student_cfg).to(device).train()
                opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
                step_time(student, opt, data[cache], 2, device, mode, t)  # warm-up
                measured = step_time(student, opt, data[cache], steps, device, mode, t)
                best[mode] = min(best[mode], measured)
    for mode, (s, w) in best.items():
        results[f"{mode}_step_s"] = round(s, 4)
        results[f"{mode}_data_wait_share"] = round(w / s, 4)
    results["kd_vs_ce_step"] = round(best["sample"][0] / best["ce"][0], 3)
    results["topk_vs_ce_step"] = round(best["topk"][0] / best["ce"][0], 3)
    results["cache_vs_online"] = round(best["online"][0] / best["sample"][0], 2)
    results["data_wait_share"] = max(results["sample_data_wait_share"], results["topk_data_wait_share"])
    print(json.dumps(results, indent=2))
    print(f"kd_vs_ce_step {results['kd_vs_ce_step']} (target <= 1.10), topk_vs_ce_step {results['topk_vs_ce_step']}, "
          f"cache_vs_online {results['cache_vs_online']} (at least 2), data_wait_share {results['data_wait_share']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
