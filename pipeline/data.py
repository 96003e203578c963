"""From anything `datasets` loads to token sequences: tokenize, chunk long documents, optionally pack, mask chat.

The result is a `datasets.Dataset` (Arrow on disk, memory-mapped, cached by `datasets` like any `.map`) with one
row per sequence: `seq_id` (stable: source row and chunk), `input_ids`, `source_row` and, for chat, `loss_mask`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
# seq_id = source row << CHUNK_BITS | chunk: stable across reruns and world sizes.
CHUNK_BITS = 20


def _check_utf8(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not valid UTF-8 (bad byte at offset {e.start}); convert it first, "
            f"e.g. iconv -f latin1 -t utf-8 {os.path.basename(path)}"
        ) from None


def _local_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    found = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, n) for n in sorted(names) if os.path.splitext(n)[1] in BUILDERS]
    return found


def load_source(data: str, split: str = "train", txt_sample_by: str = "document", limit: int | None = None):
    """A `datasets.Dataset` from local files or folders, a `save_to_disk` folder, or a hub dataset name.

    .txt files give one row per document by default (`txt_sample_by`: document, paragraph or line).
    Raises FileNotFoundError / ValueError with one-line messages.
    """
    import datasets

    path = os.path.expanduser(data)
    if os.path.isdir(path) and (os.path.exists(os.path.join(path, "state.json"))
                                or os.path.exists(os.path.join(path, "dataset_dict.json"))):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"split {split!r} not in {data}; splits are: {', '.join(ds)} (use --split)")
            ds = ds[split]
    elif os.path.exists(path):
        files = _local_files(path)
        if not files:
            raise ValueError(f"no data files in {data} (expected {', '.join(sorted(BUILDERS))})")
        kinds = {BUILDERS[os.path.splitext(f)[1]] for f in files}
        if len(kinds) > 1:
            raise ValueError(f"{data} mixes file kinds ({', '.join(sorted(kinds))}); give one kind of file")
        builder = kinds.pop()
        kwargs = {}
        if builder == "text":
            for f in files:
                _check_utf8(f)
            kwargs["sample_by"] = txt_sample_by
        ds = datasets.load_dataset(builder, data_files={"train": files}, split="train", **kwargs)
    elif data.startswith((".", "/", "~")) or data.count("/") > 1 or os.path.splitext(data)[1] in BUILDERS:
        raise FileNotFoundError(f"data path {data} does not exist")
    else:
        try:
            ds = datasets.load_dataset(data, split=split)
        except Exception as e:  # datasets raises many types for an unreachable or unknown name
            raise ValueError(f"could not load dataset {data!r} (split {split!r}): {str(e).splitlines()[0]}") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"dataset {data} has no rows")
    return ds


@dataclass
class TokenizeConfig:
    """How rows become sequences."""

    max_length: int  # longest sequence; longer documents are split into chunks, none lost
    text_field: str = "text"  # column of plain text
    messages_field: str = "messages"  # column of chat messages, used when there is no text column
    pack: bool = False  # concatenate short documents (separated by EOS) into full-length rows
    add_special_tokens: bool = True  # e.g. BOS per document, as the tokenizer defines


def detect_format(columns: list[str], cfg: TokenizeConfig) -> str:
    """'text' or 'chat', or a ValueError naming the columns that exist."""
    if cfg.text_field in columns:
        return "text"
    if cfg.messages_field in columns:
        return "chat"
    raise ValueError(
        f"text field {cfg.text_field!r} not in dataset; columns are: {', '.join(columns)} "
        "(use --text-field, or --messages-field for chat data)"
    )


def chat_ids_and_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Render a conversation with the tokenizer's chat template; mask = 1 on assistant tokens only.

    The span of each assistant turn is found by rendering the conversation up to that turn (with the generation
    prompt) and through it: this works with any template, unlike `{% generation %}` markers that few have.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; give plain text (--text-field) or a chat-tuned tokenizer")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if full.startswith(through) and through.startswith(before):
            spans.append((len(before), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= s and e <= b for a, b in spans) and e > s) for s, e in enc["offset_mapping"]]
    return enc["input_ids"], mask


def tokenize_dataset(ds, tokenizer, cfg: TokenizeConfig, num_proc: int | None = None):
    """Sequences for capture: one row per chunk (or packed row), with seq_id, input_ids, source_row[, loss_mask].

    Empty documents produce no row; count them with `count_empty`.
    """
    kind = detect_format(ds.column_names, cfg)
    eos = tokenizer.eos_token_id

    def tokenize(batch, indices):
        out = {"seq_id": [], "input_ids": [], "source_row": []}
        if kind == "chat":
            out["loss_mask"] = []
        docs = []
        for idx, i in enumerate(indices):
            if kind == "text":
                text = batch[cfg.text_field][idx] or ""
                ids = tokenizer(text, add_special_tokens=cfg.add_special_tokens)["input_ids"] if text.strip() else []
                mask = None
            else:
                msgs = batch[cfg.messages_field][idx] or []
                ids, mask = chat_ids_and_mask(tokenizer, msgs) if msgs else ([], None)
            if ids:
                docs.append((i, ids, mask))
        rows = _pack(docs, cfg.max_length, eos) if cfg.pack else _chunk(docs, cfg.max_length)
        for seq_id, i, ids, mask in rows:
            out["seq_id"].append(seq_id)
            out["input_ids"].append(ids)
            out["source_row"].append(i)
            if kind == "chat":
                out["loss_mask"].append(mask)
        return out

    import datasets

    features = {
        "seq_id": datasets.Value("uint64"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "source_row": datasets.Value("int64"),
    }
    if kind == "chat":
        features["loss_mask"] = datasets.Sequence(datasets.Value("uint8"))
    return ds.map(
        tokenize,
        batched=True,
        batch_size=1000,
        with_indices=True,
        remove_columns=ds.column_names,
        features=datasets.Features(features),
        num_proc=num_proc,
        desc="tokenize",
    )


def _chunk(docs, max_length: int) -> list[tuple]:
    """(seq_id, source_row, ids, mask) per chunk of max_length tokens; the last chunk of a document may be short."""
    rows = []
    for i, ids, mask in docs:
        for c, start in enumerate(range(0, len(ids), max_length)):
            rows.append(((i << CHUNK_BITS) | c, i, ids[start : start + max_length],
                         None if mask is None else mask[start : start + max_length]))
    return rows


def _pack(docs, max_length: int, eos: int | None) -> list[tuple]:
    """Concatenate documents (EOS after each) and cut the stream into max_length rows.

    Packing happens inside one `map` batch; its last row may be short (kept, not dropped: nothing is lost). A packed
    row is keyed by the batch's first source row and its number in the batch, so seq_ids stay unique and stable.
    """
    if not docs:
        return []
    stream, masks, chat = [], [], docs[0][2] is not None
    for _, ids, mask in docs:
        stream += ids + ([eos] if eos is not None else [])
        if chat:
            masks += list(mask) + ([0] if eos is not None else [])
    first = docs[0][0]
    return [
        ((first << CHUNK_BITS) | j, first, stream[start : start + max_length],
         masks[start : start + max_length] if chat else None)
        for j, start in enumerate(range(0, len(stream), max_length))
    ]


def count_empty(ds, cfg: TokenizeConfig) -> int:
    """Source rows that give no sequence: null, empty or whitespace-only text, or an empty conversation."""
    import pyarrow.compute as pc

    kind = detect_format(ds.column_names, cfg)
    field = cfg.text_field if kind == "text" else cfg.messages_field
    col = ds.with_format("arrow")[field]
    if kind == "text":
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0)
    else:
        empty = pc.equal(pc.list_value_length(col), 0)
    return int(pc.sum(pc.fill_null(empty, True)).as_py() or 0)
