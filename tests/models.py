"""Tiny random teachers for the tests: a byte-level BPE tokenizer trained on a little Shakespeare and a 2-layer
GPT-2 built from a config with a fixed seed. Nothing is downloaded."""

from __future__ import annotations

import glob
import os

import torch

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "shakespeare")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def shakespeare_lines(n: int, offset: int = 0) -> list[str]:
    text = open(sorted(glob.glob(os.path.join(DATA, "train", "*.txt")))[0]).read()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[offset : offset + n]


def make_tokenizer(vocab_size: int = 384):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(shakespeare_lines(3000), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_teacher(path: str, n_layer: int = 2, n_embd: int = 32, n_positions: int = 64, seed: int = 0,
                 init_range: float = 0.3, vocab_size: int = 384) -> str:
    """Save a tiny random GPT-2 and its tokenizer to `path`; returns the path. No pad token, like GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=n_positions,
                        initializer_range=init_range, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
