"""Loading a teacher (or student) and its tokenizer, their fingerprints, and its output head applied in chunks."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_libraries() -> None:
    """Silence the progress bars and info logs of transformers and datasets (for --quiet)."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA (where the teacher was trained, fast tensor cores), fp32 on CPU (bf16 matmuls are slow there)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id: it exists, starts like a path, or has more than one '/' (hub ids have one)."""
    return os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~")) or name.count("/") > 1


def load_tokenizer(name: str, revision: str | None = None):
    from transformers import AutoTokenizer

    if looks_like_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(f"tokenizer path {name} does not exist")
    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(name), revision=revision)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load a tokenizer from {name}: {str(e).splitlines()[0]}") from None


def load_model(name: str, revision: str | None, dtype: torch.dtype, device: torch.device):
    """A causal LM in eval mode. Raises FileNotFoundError / OSError with one-line messages."""
    from transformers import AutoModelForCausalLM

    if looks_like_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(f"teacher path {name} does not exist (give a local model folder or a hub id)")
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), revision=revision, dtype=dtype)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load a causal LM from {name}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def config_fingerprint(config) -> str:
    """sha256 of a model config, without the fields that name where it was loaded from."""
    d = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "_attn_implementation"):
        d.pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what maps text to ids: the vocabulary with added tokens and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    payload = {"vocab": vocab, "special": tokenizer.special_tokens_map}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_record(tokenizer, name: str) -> dict[str, Any]:
    return {
        "name_or_path": name,
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos_token_id": tokenizer.eos_token_id,
    }


def output_vocab_size(model) -> int:
    """Width of the model's logits (may exceed len(tokenizer): embeddings are often padded)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def logits_in_chunks(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int):
    """fp32 logits of the real (unpadded) positions, row by row, `chunk` positions at a time: (n <= chunk, V) each.

    The (B, T, V) logits are never built: the final hidden states go through the output head chunk by chunk. A
    model without a separate base model and head (some remote-code models) falls back to its own logits, which
    are then (B, T, V) in the model's dtype.
    """
    keep = attention_mask.bool()
    if model.base_model is model or model.get_output_embeddings() is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[keep]
        yield from (part.float() for part in logits.split(chunk))
        return
    hidden = final_hidden(model, input_ids, attention_mask)[keep]  # (T, H): real tokens only, row-major
    for part in hidden.split(chunk):
        yield head_logits(model, part)


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last hidden states of a causal LM, without computing the (B, T, V) logits. Shape (B, T, H)."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 for a chunk of hidden states: (N, H) -> (N, V), with the model's own post-processing.

    Families that scale or cap their logits after the head are handled here (the parity test checks that this
    equals `model(...).logits`): Gemma 2/3 soft-capping, Cohere's logit_scale, Granite's logits_scaling.
    """
    logits = model.get_output_embeddings()(hidden).float()
    cfg = model.config
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    scaling = getattr(cfg, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling:
        logits = logits / scaling
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
