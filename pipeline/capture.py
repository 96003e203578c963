"""`kdcache capture`: the teacher's sparse distribution at every position of a dataset, written once to a cache.

The recipe, top to bottom: set up (ranks, teacher, data, cache writer), loop over this rank's work units (batches
bucketed by length, teacher forward, fp32 log-softmax in chunks, top-k or draws), hand each batch to the background
writer, and finish (rank 0 writes the manifest once every unit is committed).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.data import TokenizeConfig, count_empty, detect_format, load_source, tokenize_dataset
from pipeline.distributions import positions_per_chunk, sample_unique, topk_logprobs
from pipeline.runtime import BackgroundWriter, Captured, pad_batch, plan_batches, plan_units, run_stage
from pipeline.teacher import (
    config_fingerprint,
    context_length,
    load_model,
    load_tokenizer,
    logits_in_chunks,
    output_vocab_size,
    resolve_dtype,
    tokenizer_record,
)
from storage.format import MAX_DRAWS, CacheHeader
from storage.rows import RowBatch, take_rows
from storage.writer import CacheWriter

# Settings that may change when a capture is resumed: they change speed or output, never the cache's content.
RESUME_MAY_DIFFER = ("batch_tokens", "device", "quiet", "overwrite", "num_proc", "output", "head_chunk_mb")


def target_problems(mode: str, top_k: int, draws: int) -> list[str]:
    """What is wrong with the settings of the stored distribution (shared by capture and generate)."""
    problems = []
    if mode not in ("topk", "sample"):
        problems.append(f"--mode {mode!r} is not one of topk, sample")
    if top_k < 1:
        problems.append(f"--top-k {top_k} must be at least 1")
    if not 1 <= draws <= MAX_DRAWS:
        problems.append(f"--draws {draws} must be between 1 and {MAX_DRAWS}")
    return problems


@dataclass
class CaptureConfig:
    """Settings of one capture; every field is a flag of `kdcache capture`."""

    teacher: str  # anything AutoModelForCausalLM.from_pretrained takes
    data: str  # anything `datasets` loads: files, folders, a save_to_disk folder, a hub name
    output: str  # the cache directory
    revision: str | None = None  # hub revision of the teacher
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    split: str = "train"
    text_field: str = "text"
    messages_field: str = "messages"
    txt_sample_by: str = "document"  # .txt files: one row per document, paragraph or line
    limit: int | None = None  # first N source rows only
    max_length: int | None = None  # default: the teacher's context, capped at 2048
    pack: bool = False  # concatenate short documents into full-length rows
    mode: str = "topk"  # topk or sample
    top_k: int = 64
    draws: int = 50
    seed: int = 0  # fixes the draws of sample mode
    batch_tokens: int = 16_384  # padded tokens per teacher batch
    unit_rows: int = 2_048  # sequences per work unit (= per shard, = the length-bucketing window)
    head_chunk_mb: int = 512  # bound on the fp32 (positions, vocab) buffer of the log-softmax
    overwrite: bool = False
    quiet: bool = False
    num_proc: int | None = None  # tokenizer processes for datasets.map

    def check(self) -> None:
        """Collect every problem with the settings and raise them together."""
        problems = target_problems(self.mode, self.top_k, self.draws)
        if self.max_length is not None and self.max_length < 2:
            problems.append(f"--max-length {self.max_length} must be at least 2")
        if self.batch_tokens < 1 or self.unit_rows < 1:
            problems.append("--batch-tokens and --unit-rows must be positive")
        if self.txt_sample_by not in ("document", "paragraph", "line"):
            problems.append(f"--txt-sample-by {self.txt_sample_by!r} is not one of document, paragraph, line")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class CaptureResult:
    output: str
    already_complete: bool = False
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    padding_fraction: float = 0.0
    empty_rows: int = 0
    stats: dict = field(default_factory=dict)


def capture(cfg: CaptureConfig) -> CaptureResult:
    """Run the teacher over a dataset and write its sparse distributions to `cfg.output`.

    Raises:
        ValueError / FileNotFoundError / OSError: bad settings, teacher or data, with one-line messages.
        CacheMismatchError: `cfg.output` holds a cache written with other settings (and not `cfg.overwrite`).
    """
    cfg.check()
    return run_stage(_capture, cfg)


def _capture(cfg: CaptureConfig, device: torch.device, dist) -> CaptureResult:
    # ---- setup: teacher, data, cache ----------------------------------------------------------------------------
    model, tokenizer, vocab, dtype = load_teacher(cfg.teacher, cfg.revision, cfg.dtype, device,
                                                  cfg.top_k if cfg.mode == "topk" else None)
    context = context_length(model.config)
    max_length = cfg.max_length or min(context or 2048, 2048)
    if context and max_length > context:
        raise ValueError(f"--max-length {max_length} exceeds the teacher's context of {context} tokens; "
                         f"use --max-length <= {context} (longer documents are split into chunks)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    tok_cfg = TokenizeConfig(max_length=max_length, text_field=cfg.text_field,
                             messages_field=cfg.messages_field, pack=cfg.pack)
    if dist.rank != 0:
        dist.barrier()  # rank 0 tokenizes first; the others then read datasets' cache
    source = load_source(cfg.data, cfg.split, cfg.txt_sample_by, cfg.limit)
    chat = detect_format(source.column_names, tok_cfg) == "chat"
    seqs = tokenize_dataset(source, tokenizer, tok_cfg, num_proc=cfg.num_proc)
    if dist.rank == 0:
        dist.barrier()
    empty = count_empty(source, tok_cfg)
    if len(seqs) == 0:
        raise ValueError(f"dataset {cfg.data} has no non-empty rows ({empty} empty rows skipped)")

    resolved = {**asdict(cfg), "max_length": max_length, "dtype": str(dtype).removeprefix("torch."),
                "format": "chat" if chat else "text"}
    header = CacheHeader(
        mode=cfg.mode,
        vocab_size=vocab,
        k=cfg.top_k if cfg.mode == "topk" else None,
        draws=cfg.draws if cfg.mode == "sample" else None,
        loss_mask=chat,
        teacher=teacher_record(cfg.teacher, cfg.revision, model, dtype),
        tokenizer=tokenizer_record(tokenizer, cfg.teacher),
        dataset={"source": cfg.data, "split": cfg.split, "fingerprint": source._fingerprint,
                 "rows": len(source), "sequences": len(seqs), "empty_rows": empty},
        config={k: v for k, v in resolved.items() if k not in ("teacher", "data")},
    )
    units = plan_units(len(seqs), cfg.unit_rows)
    writer = open_cache(cfg.output, header, dist, cfg.overwrite)
    try:
        if writer.already_complete:
            return CaptureResult(cfg.output, already_complete=True)
        todo = [u for u in units if u[0] % dist.world == dist.rank and not writer.is_committed(u[0])]
        table = seqs.data.table
        offsets = table.column("input_ids").combine_chunks().offsets.to_numpy()
        todo_tokens = int(sum(offsets[e] - offsets[s] for _, s, e in todo))

        # ---- loop: this rank's work units ---------------------------------------------------------------------
        chunk = positions_per_chunk(vocab, cfg.head_chunk_mb << 20)
        background = BackgroundWriter(writer, header)
        computed = real = 0
        t0 = time.perf_counter()
        bar = tqdm(total=todo_tokens, unit="tok", unit_scale=True, desc=f"capture {cfg.mode}",
                   disable=cfg.quiet or dist.rank != 0, dynamic_ncols=True)
        for unit, start, end in todo:
            rows = unit_rows(table, start, end, chat)
            generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + unit)
            background.begin(unit)
            for idx in plan_batches(rows.lengths, cfg.batch_tokens):
                batch_rows = take_rows(rows, idx)
                input_ids, attention = pad_batch(_split(batch_rows), pad_id, device)
                with torch.inference_mode():
                    logits = logits_in_chunks(model, input_ids, attention, chunk)  # (<= chunk, V) fp32 each
                    captured = Captured(batch_rows)
                    captured.topk, captured.sample = sparse_targets(logits, cfg.mode, cfg.top_k, cfg.draws, generator)
                background.write(captured)
                computed += input_ids.numel()
                real += batch_rows.num_tokens
                bar.update(batch_rows.num_tokens)
            background.end()
        background.close()
        bar.close()
        seconds = time.perf_counter() - t0

        # ---- finish: one manifest, once every rank is done ----------------------------------------------------
        dist.barrier()
        padding = 1 - real / computed if computed else 0.0
        result = CaptureResult(cfg.output, rows=len(seqs), tokens=int(offsets[-1]), seconds=seconds,
                               padding_fraction=padding, empty_rows=empty)
        if dist.rank == 0:
            stats = {"seconds": round(seconds, 3), "tokens_per_s": round(real / seconds, 1) if seconds else None,
                     "padding_fraction": round(padding, 5), "world_size": dist.world, "device": str(device)}
            manifest = writer.finalize(expected_units=[u for u, _, _ in units], extra={"capture_stats": stats})
            result.stats = stats
            result.rows, result.tokens = manifest["totals"]["rows"], manifest["totals"]["tokens"]
        return result
    finally:
        writer.close()


def sparse_targets(logit_chunks, mode: str, k: int, draws: int, generator: torch.Generator):
    """Top-k (values fp16, ids int32) or draws (n_unique, ids, counts) of a sequence of (n, V) fp32 logit chunks,
    concatenated in order; the other is None. Stays on the device: the background writer moves it."""
    if mode == "topk":
        parts = [topk_logprobs(x, k) for x in logit_chunks]
        return (torch.cat([v for v, _ in parts]).to(torch.float16), torch.cat([i for _, i in parts]).to(torch.int32)), None
    parts = [sample_unique(x, draws, generator) for x in logit_chunks]
    return None, tuple(torch.cat(p) for p in zip(*parts))


def load_teacher(name: str, revision: str | None, dtype_name: str, device: torch.device, top_k: int | None):
    """(model, tokenizer, output vocabulary, dtype) of a teacher; refuses a top-k wider than the vocabulary."""
    dtype = resolve_dtype(dtype_name, device)
    model = load_model(name, revision, dtype, device)
    tokenizer = load_tokenizer(name, revision)
    vocab = output_vocab_size(model)
    if top_k is not None and top_k > vocab:
        raise ValueError(f"--top-k {top_k} is larger than the teacher's vocabulary ({vocab}); use --top-k <= {vocab}")
    return model, tokenizer, vocab, dtype


def teacher_record(name: str, revision: str | None, model, dtype: torch.dtype) -> dict:
    return {"id": name, "revision": revision, "config_fingerprint": config_fingerprint(model.config),
            "dtype": str(dtype).removeprefix("torch.")}


def open_cache(path: str, header: CacheHeader, dist, overwrite: bool) -> CacheWriter:
    """This rank's writer; rank 0 creates (or wipes) the cache before the others open it."""
    if dist.rank != 0:
        dist.barrier()
    writer = CacheWriter(path, header, writer_id=dist.rank, overwrite=overwrite and dist.rank == 0,
                         ignore_config=RESUME_MAY_DIFFER)
    if dist.rank == 0:
        dist.barrier()
    return writer


def unit_rows(table, start: int, end: int, chat: bool) -> RowBatch:
    """The sequences of one work unit as flat numpy arrays (a zero-copy slice of datasets' Arrow table)."""
    part = table.slice(start, end - start)
    ids = part.column("input_ids").combine_chunks()
    offsets = ids.offsets.to_numpy().astype(np.int64)
    rows = RowBatch(
        seq_id=part.column("seq_id").to_numpy(),
        offsets=offsets - offsets[0],
        input_ids=ids.values.to_numpy()[offsets[0] : offsets[-1]],
        prompt_len=np.zeros(part.num_rows, dtype=np.int32),
    )
    if chat:
        mask = part.column("loss_mask").combine_chunks()
        mo = mask.offsets.to_numpy()
        rows.loss_mask = mask.values.to_numpy()[mo[0] : mo[-1]]
    return rows


def _split(rows: RowBatch) -> list[np.ndarray]:
    return np.split(rows.input_ids, rows.offsets[1:-1])
