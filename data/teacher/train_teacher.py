"""Rebuild the embedded default teacher: a byte-level BPE tokenizer and a small GPT-2 trained on the training plays.

    python data/teacher/train_teacher.py [--out data/teacher] [--minutes 60] [--epochs 8]

The tokenizer is trained with `tokenizers` on data/shakespeare/train; the model with `transformers.Trainer` on
256-token blocks of those plays (each play followed by EOS), evaluated on the held-out plays in
data/shakespeare/validation, keeping the checkpoint with the best held-out loss. It is saved in fp16 with
`save_pretrained`, with `training.json` (held-out loss and perplexity, tokens, minutes) beside it.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "shakespeare")
BLOCK = 256


def blocks(tokenizer, folder: str) -> np.ndarray:
    """(n, BLOCK) token blocks of every play in `folder`, each play followed by EOS."""
    ids = []
    for path in sorted(glob.glob(os.path.join(folder, "*.txt"))):
        ids += tokenizer(open(path).read())["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // BLOCK
    return np.array(ids[: n * BLOCK], dtype=np.int64).reshape(n, BLOCK)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, data: np.ndarray):
        self.data = torch.from_numpy(data)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


class TimeBudget(TrainerCallback):
    """Stop training after `minutes` of wall time (the best checkpoint so far is kept)."""

    def __init__(self, minutes: float):
        self.deadline = time.time() + 60 * minutes

    def on_step_end(self, args, state, control, **kwargs):
        if time.time() > self.deadline:
            control.should_training_stop = True
            control.should_evaluate = True
            control.should_save = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--epochs", type=float, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(min(os.cpu_count() or 1, 2))
    set_seed(args.seed)
    t0 = time.time()

    bpe = ByteLevelBPETokenizer()
    bpe.train(sorted(glob.glob(os.path.join(CORPUS, "train", "*.txt"))), vocab_size=args.vocab,
              special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", model_max_length=BLOCK)
    train, valid = blocks(tokenizer, os.path.join(CORPUS, "train")), blocks(tokenizer, os.path.join(CORPUS, "validation"))
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=BLOCK, n_embd=args.width, n_layer=args.layers,
                        n_head=4, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    work = tempfile.mkdtemp(prefix="teacher-")
    targs = TrainingArguments(
        output_dir=work, num_train_epochs=args.epochs, per_device_train_batch_size=16, per_device_eval_batch_size=32,
        learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=100, weight_decay=0.1, logging_steps=50,
        eval_strategy="steps", eval_steps=200, save_strategy="steps", save_steps=200, save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False, seed=args.seed,
        report_to=[], dataloader_pin_memory=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=Blocks(train), eval_dataset=Blocks(valid),
                      callbacks=[TimeBudget(args.minutes)])
    trainer.train()
    held_out = trainer.evaluate()["eval_loss"]
    model = trainer.model.to(torch.float16)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    history = list({r["step"]: r for r in trainer.state.log_history if "eval_loss" in r}.values())
    result = {
        "held_out_loss": round(held_out, 4),
        "held_out_perplexity": round(math.exp(held_out), 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": int(train.size),
        "held_out_tokens": int(valid.size),
        "epochs_run": round(trainer.state.epoch, 2),
        "minutes": round((time.time() - t0) / 60, 1),
        "eval_history": [{"step": r["step"], "eval_loss": round(r["eval_loss"], 4)} for r in history],
        "config": {k: getattr(args, k) for k in ("vocab", "layers", "width", "epochs", "minutes", "seed")},
    }
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(result, f, indent=2)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
