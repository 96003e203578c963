"""`kdcache show`: one row decoded, each token with the teacher's top alternatives for the next one."""

from __future__ import annotations

import numpy as np

from storage.reader import CacheReader


def load_recorded_tokenizer(manifest: dict, override: str | None = None):
    """The tokenizer a cache records, if it is available locally (never downloads); None otherwise."""
    name = override or manifest.get("tokenizer", {}).get("name_or_path")
    if not name:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None


def format_row(cache: str, row: int, top: int = 5, tokenizer: str | None = None, max_tokens: int = 200) -> str:
    """A table of one row: position, token, and the teacher's `top` most likely next tokens with probabilities."""
    reader = CacheReader(cache)
    if not 0 <= row < reader.num_rows:
        raise IndexError(f"row {row} is out of range: the cache has {reader.num_rows} rows (use 0..{reader.num_rows - 1})")
    tok = load_recorded_tokenizer(reader.manifests[0], tokenizer)
    r = reader.read_rows(np.array([row])).row(0)

    def word(i: int) -> str:
        return repr(tok.decode([int(i)])) if tok is not None else str(int(i))

    h = reader.header
    lines = [f"row {row}  seq_id {r['seq_id']}  tokens {len(r['input_ids'])}  prompt_len {r['prompt_len']}"
             + ("" if tok is not None else "  (tokenizer not available locally: showing ids; use --tokenizer)")]
    if "text" in r:
        lines.append(f"text: {r['text'][:300]!r}")
    lines.append(f"{'t':>5}  {'token':<18} teacher's next-token distribution")
    for t, token in enumerate(r["input_ids"][:max_tokens]):
        mask = "" if "loss_mask" not in r or r["loss_mask"][t] else " (masked)"
        if h.mode == "topk":
            probs = np.exp(r["topk_logprobs"][t].astype(np.float32))
            alts = [f"{word(i)} {p:.3f}" for i, p in zip(r["topk_ids"][t][:top], probs[:top])]
            alts.append(f"| top-{h.k} mass {probs.sum():.3f}")
        else:
            ids, counts = r["sample_ids"][t], r["sample_counts"][t]
            best = np.argsort(-counts, kind="stable")[:top]
            alts = [f"{word(ids[j])} {counts[j] / h.draws:.3f}" for j in best]
            alts.append(f"| {len(ids)} unique of {h.draws} draws")
        lines.append(f"{t:>5}  {word(token):<18} {'  '.join(alts)}{mask}")
    if len(r["input_ids"]) > max_tokens:
        lines.append(f"... {len(r['input_ids']) - max_tokens} more tokens")
    return "\n".join(lines)
