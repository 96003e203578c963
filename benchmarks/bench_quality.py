"""Quality benchmark: how good a student each kind of cache makes, against CE alone and online dense KD.

    python benchmarks/bench_quality.py [--quick] [--json PATH] [--seeds 0 1 2] [--table PATH]

The embedded default teacher and student (data/), the same training slice, steps and seeds for every method:
  ce                CE on the ground truth only
  dense             online KD: the teacher in the loop, full-vocabulary forward KL (the reference)
  topk12_ghost, topk12_renorm, topk64_ghost, topk64_renorm   top-k caches, tail as the ghost bucket or renormalised
  sampled50         random-sampling KD, N = 50 draws
  seqkd             sequence-level KD: CE on the teacher's own generations
  seqkd_sampled     the teacher's generations with sampled targets along them
  seqkd_mix         those generations mixed 1:1 with the sampled50 cache (the demo's seqkd student)
Reported per method over seeds: held-out perplexity (exp of the mean held-out loss, and min-max), KL to the
teacher on the held-out plays, expected calibration error of the top-1 prediction, cache bytes per token, step time,
and the fraction of dense KD's gain over CE, (L_ce - L_x) / (L_ce - L_dense), and of the CE-to-teacher gap, (L_ce - L_x) / (L_ce - L_teacher).
Targets: sampled50 >= 95% of dense KD's gain; topk64_ghost >= 85%; the best student closes >= 40% of the gap.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.capture import CaptureConfig, capture  # noqa: E402
from pipeline.demo import DemoConfig, cache_info, write_prompts  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.generate import GenerateConfig, generate  # noqa: E402
from pipeline.losses import next_token_labels  # noqa: E402
from pipeline.teacher import quiet_libraries  # noqa: E402
from pipeline.train import KDTrainer, TrainConfig, train  # noqa: E402

METHODS = {  # name -> (cache, train overrides)
    "ce": ("topk64", {"ce_weight": 1.0}),
    "dense": ("topk64", {"online": True}),
    "topk12_ghost": ("topk12", {"tail": "ghost"}),
    "topk12_renorm": ("topk12", {"tail": "renorm"}),
    "topk64_ghost": ("topk64", {"tail": "ghost"}),
    "topk64_renorm": ("topk64", {"tail": "renorm"}),
    "sampled50": ("sampled50", {}),
    "seqkd": ("seqkd_topk", {"ce_weight": 1.0}),
    "seqkd_sampled": ("seqkd_sampled", {}),
    "seqkd_mix": ("seqkd_sampled:1,sampled50:1", {}),
}


def online_trainer(teacher_path: str):
    """A KDTrainer whose KD term is the dense forward KL to a live teacher (same batches, same CE weight)."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()

    class OnlineKDTrainer(KDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:  # evaluation: held-out CE, as for every other method
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            ids, attn = inputs["input_ids"].long(), inputs["attention_mask"].long()
            out = model(input_ids=ids, attention_mask=attn)
            mask = inputs["target_mask"].bool()
            with torch.inference_mode():
                t_logp = F.log_softmax(teacher.to(ids.device)(input_ids=ids, attention_mask=attn).logits[mask].float(), -1)
            s_logp = F.log_softmax(out.logits[mask].float(), -1)
            n = mask.sum().clamp(min=1)
            ce = -s_logp.gather(-1, next_token_labels(ids, mask)[:, None]).sum() / n
            kd = F.kl_div(s_logp, t_logp.clone(), log_target=True, reduction="sum") / n
            w = self.kd["ce_weight"]
            loss = w * ce + (1 - w) * kd
            self.record_parts(ce.detach(), kd.detach())
            return (loss, out) if return_outputs else loss

    return OnlineKDTrainer


def build_caches(cfg: DemoConfig, root: str) -> dict[str, dict]:
    info = {}
    for name, kw in (("topk64", {"top_k": 64}), ("topk12", {"top_k": 12}), ("sampled50", {"mode": "sample", "draws": 50})):
        t0 = time.time()
        capture(CaptureConfig(teacher=cfg.teacher, output=os.path.join(root, name), overwrite=True, quiet=True,
                              **cfg.train_slice(), **kw))
        info[name] = cache_info(os.path.join(root, name), time.time() - t0)
    prompts = os.path.join(root, "prompts.jsonl")
    write_prompts(cfg, prompts)
    for name, kw in (("seqkd_topk", {"top_k": 64}), ("seqkd_sampled", {"mode": "sample", "draws": 50})):
        t0 = time.time()
        generate(GenerateConfig(teacher=cfg.teacher, prompts=prompts, output=os.path.join(root, name),
                                max_new_tokens=cfg.new_tokens, seed=0, quiet=True, overwrite=True, **kw))
        info[name] = cache_info(os.path.join(root, name), time.time() - t0)
    capture(CaptureConfig(teacher=cfg.teacher, data=cfg.valid_dir, output=os.path.join(root, "heldout"), top_k=64,
                          quiet=True, overwrite=True))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and a smaller slice, one seed")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--teacher", default=None, help="default: the teacher shipped in data/")
    ap.add_argument("--table", default=None, metavar="JSON", help="print the table of a saved --json run and exit")
    args = ap.parse_args()
    if args.table:
        results = json.load(open(args.table))
        results["methods"] = {n: aggregate(a) for n, a in results["methods"].items()}
        add_fractions(results)
        print(format_table(results))
        return
    quiet_libraries()
    torch.set_num_threads(min(os.cpu_count() or 1, 2))
    cfg = DemoConfig()
    cfg.teacher = args.teacher or cfg.teacher
    if args.quick:
        cfg.paragraphs, cfg.prompts, cfg.steps = 1500, 64, 60
    cfg.steps = args.steps or cfg.steps
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    results: dict = {"steps": cfg.steps, "seeds": seeds, "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        results["caches"] = build_caches(cfg, tmp)
        teacher = evaluate(cfg.teacher, cfg.valid_dir)
        results["teacher"] = {"perplexity": teacher["perplexity"], "ece": teacher["ece"]}
        for name in args.methods:
            cache, over = METHODS[name]
            over = dict(over)
            online = over.pop("online", False)
            runs = []
            for seed in seeds:
                out = os.path.join(tmp, "runs", f"{name}-{seed}")
                kw = dict(cfg.recipe(seed), save_steps=cfg.steps, logging_steps=cfg.steps, quiet=True, overwrite=True)
                tc = TrainConfig(caches=[os.path.join(tmp, c) for c in cache.split(",")], output=out, **{**kw, **over})
                summary = train(tc, trainer_class=online_trainer(cfg.teacher) if online else None)
                ev = evaluate(out, cfg.valid_dir, cache=os.path.join(tmp, "heldout"))
                runs.append({"seed": seed, "perplexity": ev["perplexity"], "kl_to_teacher": ev["kl_to_teacher"],
                             "ece": ev["ece"],
                             "step_seconds": summary["final_metrics"]["train_seconds"] / max(cfg.steps, 1)})
            bpt = None if online else results["caches"][cache.split(":")[0]]["bytes_per_token"]
            agg = aggregate({"bytes_per_token": bpt, "runs": runs})
            results["methods"][name] = agg
            print(f"{name:15s} ppl {agg['perplexity']:8.2f} ({agg['perplexity_min']:.0f}-{agg['perplexity_max']:.0f})  "
                  f"KL {agg['kl_to_teacher']:.4f}  ECE {agg['ece']:.4f}", flush=True)
    add_fractions(results)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def aggregate(method: dict) -> dict:
    """A method's figures over its seeds' runs: held-out loss L = mean of log perplexity, perplexity = exp(L) with
    min and max, and the means of KL, ECE and step time. Derived from `runs` only, so a saved JSON re-derives them."""
    runs = method["runs"]
    ppls = [r["perplexity"] for r in runs]
    loss = float(np.mean(np.log(ppls)))
    out = {"loss": loss, "perplexity": math.exp(loss), "perplexity_min": min(ppls), "perplexity_max": max(ppls)}
    out.update({k: float(np.mean([r[k] for r in runs])) for k in ("kl_to_teacher", "ece", "step_seconds")})
    return {**out, "bytes_per_token": method["bytes_per_token"], "runs": runs}


def add_fractions(results: dict) -> None:
    """Per method: the fraction of dense KD's gain over CE and of the CE-to-teacher gap, from held-out losses:
    (L_ce - L_x) / (L_ce - L_dense) and (L_ce - L_x) / (L_ce - L_teacher)."""
    m = results["methods"]
    loss = {n: a["loss"] for n, a in m.items()}
    l_t = math.log(results["teacher"]["perplexity"])
    for name, agg in m.items():
        if "ce" in m:
            agg["gap_closed"] = (loss["ce"] - loss[name]) / (loss["ce"] - l_t) if loss["ce"] > l_t else None
        if "ce" in m and "dense" in m:
            gain = loss["ce"] - loss["dense"]
            agg["of_dense_gain"] = (loss["ce"] - loss[name]) / gain if gain != 0 else None


def format_table(r: dict) -> str:
    lines = [f"teacher held-out perplexity {r['teacher']['perplexity']:.2f}; {r['steps']} steps; seeds {r['seeds']}", "",
             "| method | held-out ppl (min-max) | KL to teacher | ECE | bytes/token | s/step | of dense gain | gap closed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, a in r["methods"].items():
        pct = lambda x: "-" if x is None else f"{x:.0%}"  # noqa: E731
        bpt = "-" if a["bytes_per_token"] is None else f"{a['bytes_per_token']:.0f}"
        lines.append(f"| {name} | {a['perplexity']:.1f} ({a['perplexity_min']:.0f}-{a['perplexity_max']:.0f}) | "
                     f"{a['kl_to_teacher']:.4f} | "
                     f"{a['ece']:.4f} | {bpt} | {a['step_seconds']:.3f} | {pct(a.get('of_dense_gain'))} | "
                     f"{pct(a.get('gap_closed'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
