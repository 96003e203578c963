"""`kdcache generate`: the teacher's own continuations of prompts, with its distribution at every generated step.

Sequence-level KD (Kim & Rush 2016) trains on what the teacher writes; storing the teacher's distribution along
those tokens gives "word + sequence" KD from one teacher pass. The distributions come from `generate`'s raw
(temperature 1, unprocessed) logits, so nothing is computed twice.

Row layout (as captured rows): input_ids = prompt + generated tokens (through EOS), prompt_len = the prompt's
length, position t holds the distribution over token t+1: positions prompt_len - 1 .. len - 2 hold the
distributions the generated tokens were drawn from; the prompt's other positions and the last one hold none
(top-k: all -inf; sampled: no ids). The student's loss covers the generated tokens only.

Reuses capture's teacher loading, work units, background writer, resume, torchrun and fingerprints.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.capture import (
    CaptureResult,
    load_teacher,
    open_cache,
    sparse_targets,
    target_problems,
    teacher_record,
)
from pipeline.data import CHUNK_BITS, load_source
from pipeline.runtime import BackgroundWriter, Captured, plan_units, run_stage
from pipeline.teacher import context_length, tokenizer_record
from storage.format import CacheHeader
from storage.rows import RowBatch


@dataclass
class GenerateConfig:
    """Settings of one generation run; every field is a flag of `kdcache generate`."""

    teacher: str
    prompts: str  # anything `datasets` loads
    output: str
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    split: str = "train"
    prompt_field: str = "text"
    messages_field: str = "messages"  # chat prompts, rendered with the generation prompt added
    limit: int | None = None
    max_new_tokens: int = 128
    max_prompt_length: int | None = None  # longer prompts keep their last tokens; default: context - new tokens
    num_samples: int = 1  # sequences per prompt
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k_sampling: int = 0  # 0: no top-k filter while sampling
    num_beams: int = 1
    mode: str = "topk"
    top_k: int = 64
    draws: int = 50
    seed: int = 0
    batch_size: int = 32  # prompts per generate call
    unit_rows: int = 256  # prompts per work unit (= per shard)
    head_chunk_mb: int = 512
    overwrite: bool = False
    quiet: bool = False
    num_proc: int | None = None

    def check(self) -> None:
        problems = target_problems(self.mode, self.top_k, self.draws)
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if self.num_samples < 1 or self.batch_size < 1 or self.unit_rows < 1:
            problems.append("--num-samples, --batch-size and --unit-rows must be positive")
        if self.num_beams > 1 and self.num_samples > self.num_beams:
            problems.append(f"--num-samples {self.num_samples} exceeds --num-beams {self.num_beams}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            problems.append("--temperature must be positive and --top-p in (0, 1]")
        if problems:
            raise ValueError("; ".join(problems))

    def generation_kwargs(self, eos: int | None, pad: int) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "num_return_sequences": self.num_samples,
              "eos_token_id": eos, "pad_token_id": pad, "return_dict_in_generate": True, "output_logits": True}
        if self.num_beams > 1:
            return {**kw, "do_sample": False, "num_beams": self.num_beams}
        if self.greedy:
            return {**kw, "do_sample": False}
        return {**kw, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k_sampling or None}


def tokenize_prompts(source, tokenizer, cfg: GenerateConfig, max_prompt: int) -> list[np.ndarray]:
    """Prompt token ids per row: plain text, or chat messages with the generation prompt; left-truncated."""
    columns = source.column_names
    if cfg.prompt_field in columns:
        texts = source[cfg.prompt_field]
        ids = [tokenizer(t or "")["input_ids"] for t in texts]
    elif cfg.messages_field in columns:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat prompts need a tokenizer with a chat template")
        ids = [tokenizer(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for m in source[cfg.messages_field]]
    else:
        raise ValueError(f"prompt field {cfg.prompt_field!r} not in dataset; columns are: {', '.join(columns)} "
                         "(use --prompt-field, or --messages-field for chat prompts)")
    return [np.array(x[-max_prompt:], dtype=np.int32) for x in ids]


def generate(cfg: GenerateConfig) -> CaptureResult:
    """Generate continuations of every prompt and write them, with the teacher's distributions, to a cache."""
    cfg.check()
    return run_stage(_generate, cfg)


def _generate(cfg: GenerateConfig, device: torch.device, dist) -> CaptureResult:
    # ---- setup: teacher, prompts, cache ---------------------------------------------------------------------
    model, tokenizer, vocab, dtype = load_teacher(cfg.teacher, cfg.revision, cfg.dtype, device,
                                                  cfg.top_k if cfg.mode == "topk" else None)
    context = context_length(model.config) or 2048
    max_prompt = cfg.max_prompt_length or context - cfg.max_new_tokens
    if max_prompt < 1 or max_prompt + cfg.max_new_tokens > context:
        raise ValueError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the teacher's context "
                         f"of {context} tokens; lower it or --max-prompt-length")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    source = load_source(cfg.prompts, cfg.split, limit=cfg.limit)
    prompts = tokenize_prompts(source, tokenizer, cfg, max_prompt)
    keep = [i for i, p in enumerate(prompts) if len(p)]
    if not keep:
        raise ValueError(f"dataset {cfg.prompts} has no non-empty prompts")
    header = CacheHeader(
        mode=cfg.mode, vocab_size=vocab, k=cfg.top_k if cfg.mode == "topk" else None,
        draws=cfg.draws if cfg.mode == "sample" else None, text=True,
        teacher=teacher_record(cfg.teacher, cfg.revision, model, dtype),
        tokenizer=tokenizer_record(tokenizer, cfg.teacher),
        dataset={"source": cfg.prompts, "split": cfg.split, "fingerprint": source._fingerprint, "rows": len(source),
                 "prompts": len(keep), "empty_rows": len(prompts) - len(keep)},
        config={**{k: v for k, v in asdict(cfg).items() if k not in ("teacher", "prompts")},
                "max_prompt_length": max_prompt, "dtype": str(dtype).removeprefix("torch."), "stage": "generate"},
    )
    units = plan_units(len(keep), cfg.unit_rows)
    writer = open_cache(cfg.output, header, dist, cfg.overwrite)
    try:
        if writer.already_complete:
            return CaptureResult(cfg.output, already_complete=True)
        todo = [u for u in units if u[0] % dist.world == dist.rank and not writer.is_committed(u[0])]
        gen_kwargs = cfg.generation_kwargs(eos, pad)
        chunk = max(1, (cfg.head_chunk_mb << 20) // (vocab * 12))

        # ---- loop: this rank's work units, prompts sorted by length inside each -----------------------------
        background = BackgroundWriter(writer, header)
        generated = 0
        t0 = time.perf_counter()
        bar = tqdm(total=sum((e - s) * cfg.num_samples for _, s, e in todo), unit="seq", desc="generate",
                   disable=cfg.quiet or dist.rank != 0, dynamic_ncols=True)
        for unit, start, end in todo:
            rows_idx = np.array(keep[start:end])
            order = rows_idx[np.argsort([-len(prompts[i]) for i in rows_idx], kind="stable")]
            generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + unit)
            background.begin(unit)
            for b, first in enumerate(range(0, len(order), cfg.batch_size)):
                batch = order[first : first + cfg.batch_size]
                # Sampling randomness is fixed by (seed, work unit, batch): a resumed run redoes whole units the
                # same way, so it generates the same sequences.
                torch.manual_seed(hash((cfg.seed, unit, b)) % (2**63))
                captured = _generate_batch(model, tokenizer, [prompts[i] for i in batch], batch, cfg, gen_kwargs,
                                           pad, eos, device, chunk, generator)
                background.write(captured)
                generated += int(captured.rows.num_tokens - captured.rows.prompt_len.sum())
                bar.update(len(batch) * cfg.num_samples)
            background.end()
        background.close()
        bar.close()
        seconds = time.perf_counter() - t0

        # ---- finish --------------------------------------------------------------------------------------------
        dist.barrier()
        result = CaptureResult(cfg.output, seconds=seconds, rows=len(keep) * cfg.num_samples)
        if dist.rank == 0:
            stats = {"seconds": round(seconds, 3), "generated_tokens": generated,
                     "generated_tokens_per_s": round(generated / seconds, 1) if seconds else None,
                     "world_size": dist.world, "device": str(device)}
            manifest = writer.finalize(expected_units=[u for u, _, _ in units], extra={"generate_stats": stats})
            result.stats, result.tokens = stats, manifest["totals"]["tokens"]
        return result
    finally:
        writer.close()


def _generate_batch(model, tokenizer, prompts: list[np.ndarray], rows: np.ndarray, cfg: GenerateConfig,
                    gen_kwargs: dict, pad: int, eos: int | None, device, chunk: int, generator) -> Captured:
    """One left-padded `generate` call and the rows it yields, with their sparse distributions on the device."""
    P = max(len(p) for p in prompts)
    ids = np.full((len(prompts), P), pad, dtype=np.int64)
    mask = np.zeros((len(prompts), P), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = p
        mask[i, P - len(p) :] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=torch.from_numpy(ids).to(device),
                             attention_mask=torch.from_numpy(mask).to(device), **gen_kwargs)
    new = out.sequences[:, P:].cpu().numpy()  # (R, S): R = prompts x num_samples
    S = new.shape[1]
    steps = torch.stack(out.logits, dim=1)  # (R or R x beams, S, V) raw logits
    beams = getattr(out, "beam_indices", None) if cfg.num_beams > 1 else None
    seq_prompt = np.repeat(np.arange(len(prompts)), cfg.num_samples)
    lengths = []
    for r in range(new.shape[0]):  # cut each sequence after its first EOS (kept, so students learn to stop)
        hit = np.flatnonzero(new[r] == eos) if eos is not None else []
        lengths.append(int(hit[0]) + 1 if len(hit) else S)
    # logits of the kept steps, sequence by sequence: (sum of generated lengths, V)
    picked = []
    for r, g in enumerate(lengths):
        if beams is not None:
            picked.append(steps[beams[r, :g].long().clamp(min=0), torch.arange(g, device=steps.device)])
        else:
            picked.append(steps[r, :g])
    flat = torch.cat(picked).float()
    del steps, out
    topk, sample = sparse_targets(flat.split(chunk), cfg.mode, cfg.top_k, cfg.draws, generator)

    # rows: prompt + generated; distributions at positions prompt_len - 1 .. len - 2, none elsewhere
    plens = np.array([len(prompts[i]) for i in seq_prompt], dtype=np.int64)
    glens = np.array(lengths, dtype=np.int64)
    row_lens = plens + glens
    offsets = np.concatenate([[0], np.cumsum(row_lens)])
    input_ids = np.concatenate([np.concatenate([prompts[i], new[r, :g]]) for r, (i, g) in
                                enumerate(zip(seq_prompt, glens))]).astype(np.int32)
    where = torch.from_numpy(np.concatenate([np.arange(o + p - 1, o + p - 1 + g) for o, p, g in
                                             zip(offsets[:-1], plens, glens)])).to(flat.device)
    T = int(offsets[-1])
    captured = Captured(RowBatch(
        seq_id=np.array([(int(rows[i]) << CHUNK_BITS) | (r % cfg.num_samples) for r, i in enumerate(seq_prompt)],
                        dtype=np.uint64),
        offsets=offsets, input_ids=input_ids, prompt_len=plens.astype(np.int32),
        text=[tokenizer.decode(new[r, :g], skip_special_tokens=True) for r, g in enumerate(glens)],
    ))
    if topk is not None:
        values = torch.full((T, cfg.top_k), float("-inf"), dtype=torch.float16, device=flat.device)
        ids_full = torch.zeros((T, cfg.top_k), dtype=torch.int32, device=flat.device)
        values[where], ids_full[where] = topk
        captured.topk = (values, ids_full)
    else:
        n_unique, s_ids, s_counts = sample
        n_full = torch.zeros(T, dtype=n_unique.dtype, device=flat.device)
        n_full[where] = n_unique
        captured.sample = (n_full, s_ids, s_counts)
    return captured
