"""`kdcache train`: a student trained from one or more caches with `transformers.Trainer` and a sparse KD loss.

The recipe, top to bottom: check the run directory and the caches, load the student and check its vocabulary
against the cache, build the batch dataset, build TrainingArguments (file, then flags), train with the KD loss,
save the student with `save_pretrained` in RUN, and write RUN/kdcache.json, RUN/metrics.jsonl and RUN/curves.png.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from pipeline.losses import LOSSES, TAILS, distill_loss
from pipeline.teacher import context_length, output_vocab_size, tokenizer_fingerprint
from pipeline.train_data import CacheBatches, TextBatches, parse_cache_arg, unwrap_batch
from storage.format import CacheMismatchError, write_json_atomic
from storage.reader import load_manifest

# kdcache flag -> TrainingArguments field; a flag left unset falls back to --trainer-args, then to the default here.
FLAG_TO_ARG = {
    "max_steps": ("max_steps", -1),
    "epochs": ("num_train_epochs", 1.0),
    "grad_accum": ("gradient_accumulation_steps", 1),
    "lr": ("learning_rate", 5e-4),
    "warmup": ("warmup_steps", 0),
    "weight_decay": ("weight_decay", 0.0),
    "seed": ("seed", 0),
    "save_steps": ("save_steps", 500),
    "eval_steps": ("eval_steps", None),
    "bf16": ("bf16", False),
    "logging_steps": ("logging_steps", 10),
    "num_workers": ("dataloader_num_workers", 0),
}


@dataclass
class TrainConfig:
    """Settings of one student run; every field is a flag of `kdcache train`. None means "not given"."""

    caches: list[str]  # cache paths, each optionally with :weight
    output: str  # RUN directory
    student: str  # pretrained model (folder or hub id), or a config.json / folder with only a config
    loss: str = "fkl"  # one of LOSSES
    tail: str = "ghost"  # top-k tail handling: ghost, renorm, label
    ce_weight: float = 0.5  # loss = ce_weight * CE + (1 - ce_weight) * KD
    temperature: float = 1.0  # student temperature in the KD term
    beta: float = 0.5  # generalised JSD mixture
    batch_size: int = 8  # rows per device batch
    max_steps: int | None = None
    epochs: float | None = None
    grad_accum: int | None = None
    lr: float | None = None
    warmup: int | None = None
    weight_decay: float | None = None
    seed: int | None = None
    save_steps: int | None = None
    eval_steps: int | None = None
    bf16: bool | None = None
    logging_steps: int | None = None
    num_workers: int | None = None
    eval_data: str | None = None  # held-out text, evaluated every eval_steps
    max_eval_rows: int | None = None  # held-out sequences (chunks) evaluated during training, spread evenly
    trainer_args: str | None = None  # JSON or YAML file of further TrainingArguments fields
    resume: bool = False  # continue from the latest checkpoint in RUN
    overwrite: bool = False  # replace whatever run is in RUN
    allow_mixed_teachers: bool = False
    report_to: str = "none"
    quiet: bool = False

    def check(self) -> None:
        problems = []
        if self.loss not in LOSSES:
            problems.append(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.tail not in TAILS:
            problems.append(f"unknown tail {self.tail!r}; choose one of {', '.join(TAILS)}")
        if not 0.0 <= self.ce_weight <= 1.0:
            problems.append(f"--ce-weight {self.ce_weight} is outside [0, 1]")
        if self.temperature <= 0:
            problems.append(f"--temperature {self.temperature} must be positive")
        if not 0.0 <= self.beta <= 1.0:
            problems.append(f"--beta {self.beta} is outside [0, 1]")
        if self.batch_size < 1:
            problems.append(f"--batch-size {self.batch_size} must be at least 1")
        if self.resume and self.overwrite:
            problems.append("--resume and --overwrite exclude each other")
        if not self.caches:
            problems.append("give at least one cache")
        if problems:
            raise ValueError("; ".join(problems))


def check_run_dir(cfg: TrainConfig) -> None:
    """Refuse to mix two runs in one directory."""
    if not os.path.isdir(cfg.output) or not os.listdir(cfg.output):
        if cfg.resume:
            raise ValueError(f"--resume: {cfg.output} holds no run to resume")
        return
    if cfg.resume:
        if not glob.glob(os.path.join(cfg.output, "checkpoint-*")):
            raise ValueError(f"--resume: {cfg.output} has no checkpoint-* to resume from")
        return
    if cfg.overwrite:
        shutil.rmtree(cfg.output)
        return
    raise ValueError(f"{cfg.output} already holds a run; use --resume to continue it, --overwrite to replace it, "
                     "or another -o")


def load_student(spec: str, seed: int):
    """(model, tokenizer or None, from_scratch). A config (file, or folder without weights) is initialised fresh."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = os.path.expanduser(spec)
    weights = glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "*.bin"))
    scratch = (os.path.isfile(path) and path.endswith(".json")) or (os.path.isdir(path) and not weights)
    if (path.startswith((".", "/", "~")) or spec.count("/") > 1) and not os.path.exists(path):
        raise FileNotFoundError(f"student {spec} does not exist (give a model folder, a config.json, or a hub id)")
    try:
        if scratch:
            config = AutoConfig.from_pretrained(path)
            set_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        else:
            model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load student {spec}: {str(e).splitlines()[0]}") from None
    tokenizer = None
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    has_files = any(os.path.exists(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer_config.json"))
    if has_files or not os.path.exists(path):  # a local folder without tokenizer files has none; a hub id may
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder if os.path.exists(path) else spec)
        except (OSError, ValueError, TypeError):
            pass
    return model, tokenizer, scratch


def teacher_tokenizer(manifest: dict):
    """The tokenizer a cache records, when it is available locally; else None."""
    from transformers import AutoTokenizer

    name = manifest.get("tokenizer", {}).get("name_or_path")
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True) if name else None
    except (OSError, ValueError):
        return None


def check_vocab(manifest: dict, model, tokenizer) -> str | None:
    """Refuse a student whose tokenizer or vocabulary does not fit the cache; return a note when padded.

    Raises:
        CacheMismatchError: different tokenizer, or an output layer smaller than the tokenizer.
    """
    tok = manifest.get("tokenizer", {})
    if tokenizer is not None and tok.get("fingerprint") and tokenizer_fingerprint(tokenizer) != tok["fingerprint"]:
        raise CacheMismatchError(
            f"the student's tokenizer differs from the teacher's recorded in the cache (vocab {len(tokenizer)} vs "
            f"{tok.get('vocab_size')}, fingerprints {tokenizer_fingerprint(tokenizer)[:12]} vs "
            f"{tok['fingerprint'][:12]}); distillation from this cache needs the teacher's tokenizer"
        )
    student_vocab, cache_vocab = output_vocab_size(model), int(manifest["vocab_size"])
    needed = int(tok.get("vocab_size") or cache_vocab)
    if student_vocab < needed:
        raise CacheMismatchError(
            f"the student's output layer has {student_vocab} ids, fewer than the teacher's tokenizer ({needed}); "
            "resize the student's embeddings to at least that"
        )
    if student_vocab != cache_vocab:
        return (f"note: student vocabulary {student_vocab} != teacher logits {cache_vocab} (padded embeddings); "
                f"teacher ids >= {student_vocab}, if any, count as the tail")
    return None


def cache_fingerprint(manifest: dict) -> str:
    """sha256 over the shards' hashes: one id for a cache's content."""
    return hashlib.sha256("".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()


class KDTrainer(Trainer):
    """A Trainer whose loss is `distill_loss`; everything else (DDP, accumulation, checkpoints) is the Trainer's."""

    def __init__(self, *args, kd: dict[str, Any], **kwargs):
        super().__init__(*args, **kwargs)
        self.kd = kd
        self._sums = {"ce": 0.0, "kd": 0.0, "n": 0}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(input_ids=inputs["input_ids"].long(), attention_mask=inputs["attention_mask"].long())
        loss, parts = distill_loss(out.logits, inputs, **self.kd)
        if model.training:
            self.record_parts(parts["ce"], parts["kd"])
        return (loss, out) if return_outputs else loss

    def record_parts(self, ce: torch.Tensor, kd: torch.Tensor) -> None:
        """Accumulate a training step's CE and KD terms; `log` reports their mean since the last log."""
        self._sums["ce"] += float(ce)
        self._sums["kd"] += float(kd)
        self._sums["n"] += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._sums["n"]:
            logs["ce"] = round(self._sums["ce"] / self._sums["n"], 5)
            logs["kd"] = round(self._sums["kd"] / self._sums["n"], 5)
            self._sums = {"ce": 0.0, "kd": 0.0, "n": 0}
        if "eval_loss" in logs:
            logs["eval_perplexity"] = float(torch.exp(torch.tensor(logs["eval_loss"])))
        super().log(logs, *args, **kwargs)


class MetricsFile(TrainerCallback):
    """Appends every log record to RUN/metrics.jsonl (main process only)."""

    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def training_arguments(cfg: TrainConfig, eval_enabled: bool) -> TrainingArguments:
    """TrainingArguments from --trainer-args (if any), overridden by the flags that were given."""
    values: dict[str, Any] = {}
    if cfg.trainer_args:
        values.update(_read_args_file(cfg.trainer_args))
    for flag, (field, default) in FLAG_TO_ARG.items():
        given = getattr(cfg, flag)
        if given is not None:
            values[field] = given
        else:
            values.setdefault(field, default)
    if values.get("eval_steps") is None:
        values.pop("eval_steps")
    values.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    values.update(
        output_dir=cfg.output,
        per_device_train_batch_size=1,  # items are whole batches of cfg.batch_size rows
        per_device_eval_batch_size=1,
        remove_unused_columns=False,
        label_names=["target_mask"],  # so that evaluation computes the (CE) loss
        save_strategy="steps",
        eval_strategy="steps" if eval_enabled else "no",
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        disable_tqdm=cfg.quiet,
    )
    if eval_enabled and "eval_steps" not in values:
        values["eval_steps"] = values["save_steps"]
    try:
        return TrainingArguments(**values)
    except TypeError as e:
        raise ValueError(f"--trainer-args: {e}") from None


def _read_args_file(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"--trainer-args file {path} does not exist")
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(f)
        else:
            data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"--trainer-args file {path} must hold a mapping of TrainingArguments fields")
    return data


def eval_dataset(data: str, tokenizer, max_length: int, batch_size: int, pad_id: int, max_rows: int | None = None):
    """Held-out text, chunked exactly as capture chunks it; at most max_rows chunks, spread evenly over the text."""
    from pipeline.data import TokenizeConfig, load_source, tokenize_dataset

    source = load_source(data)
    seqs = tokenize_dataset(source, tokenizer, TokenizeConfig(max_length=max_length))
    table = seqs.data.table.column("input_ids").combine_chunks()
    offsets = table.offsets.to_numpy()
    values = table.values.to_numpy()
    rows = np.arange(len(offsets) - 1)
    if max_rows is not None and max_rows < len(rows):
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).astype(int)]
    return TextBatches([values[offsets[i] : offsets[i + 1]] for i in rows], batch_size, pad_id)


def train(cfg: TrainConfig, trainer_class: type[KDTrainer] | None = None) -> dict[str, Any]:
    """Train a student from caches; returns the contents of RUN/kdcache.json.

    trainer_class: a KDTrainer subclass to use instead (the quality benchmark's online-teacher reference).

    Raises:
        ValueError / FileNotFoundError / OSError / CacheError with one-line messages for bad input.
    """
    # ---- setup: run directory, caches, student ------------------------------------------------------------------
    cfg.check()
    if cfg.quiet:
        from pipeline.teacher import quiet_libraries

        quiet_libraries()
    caches = [parse_cache_arg(c) for c in cfg.caches]
    manifests = [load_manifest(p) for p, _ in caches]
    check_run_dir(cfg)
    seed = cfg.seed if cfg.seed is not None else 0
    model, tokenizer, scratch = load_student(cfg.student, seed)
    if tokenizer is None:
        tokenizer = teacher_tokenizer(manifests[0])
    note = check_vocab(manifests[0], model, tokenizer)
    if note and not cfg.quiet:
        print(note)
    pad_id = (tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None
              else (tokenizer.eos_token_id if tokenizer is not None and tokenizer.eos_token_id is not None else 0))
    train_set = CacheBatches(caches, cfg.batch_size, seed=seed, pad_id=pad_id,
                             allow_mixed_teachers=cfg.allow_mixed_teachers)
    context = context_length(model.config)
    if context and train_set.longest > context:
        raise ValueError(f"the caches hold rows of up to {train_set.longest} tokens, longer than the student's context "
                         f"of {context}; recapture with --max-length {context} or use a student with a longer context")
    eval_set = None
    if cfg.eval_data:
        if tokenizer is None:
            raise ValueError("--eval-data needs a tokenizer: the student has none and the cache's is not available")
        max_length = min(int(manifests[0].get("config", {}).get("max_length") or 2048), context or 2048)
        eval_set = eval_dataset(cfg.eval_data, tokenizer, max_length, cfg.batch_size, pad_id, cfg.max_eval_rows)

    # ---- loop: the Trainer -------------------------------------------------------------------------------------
    args = training_arguments(cfg, eval_set is not None)
    os.makedirs(cfg.output, exist_ok=True)
    kd = {"ce_weight": cfg.ce_weight, "loss": cfg.loss, "tail": cfg.tail, "temperature": cfg.temperature,
          "beta": cfg.beta}
    trainer = (trainer_class or KDTrainer)(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                        data_collator=unwrap_batch, kd=kd, callbacks=[MetricsFile(os.path.join(cfg.output, "metrics.jsonl"))])
    if cfg.quiet:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    result = trainer.train(resume_from_checkpoint=True if cfg.resume else None)
    final = {"train_loss": result.training_loss, "steps": result.global_step,
             "train_seconds": result.metrics.get("train_runtime")}
    if eval_set is not None:
        metrics = trainer.evaluate()
        final.update(eval_loss=metrics["eval_loss"], eval_perplexity=float(torch.exp(torch.tensor(metrics["eval_loss"]))))

    # ---- save: the student, its tokenizer, the resolved config and provenance --------------------------------
    summary = {
        "config": {**asdict(cfg), "resolved_training_args": {k: getattr(args, v[0]) for k, v in FLAG_TO_ARG.items()}},
        "student": {"source": cfg.student, "from_scratch": scratch, "parameters": sum(p.numel() for p in model.parameters())},
        "caches": [{"path": p, "weight": w, "fingerprint": cache_fingerprint(m), "teacher": m.get("teacher"),
                    "mode": m["mode"], "k": m.get("k"), "draws": m.get("draws"), "tokens": m["totals"]["tokens"]}
                   for (p, w), m in zip(caches, manifests)],
        "tokenizer": manifests[0].get("tokenizer", {}).get("fingerprint"),
        "final_metrics": final,
    }
    if trainer.is_world_process_zero():
        trainer.save_model(cfg.output)
        if tokenizer is not None:
            tokenizer.save_pretrained(cfg.output)
        write_json_atomic(os.path.join(cfg.output, "kdcache.json"), summary)
        plot_curves(os.path.join(cfg.output, "metrics.jsonl"), os.path.join(cfg.output, "curves.png"))
    return summary


def plot_curves(metrics_path: str, out_png: str) -> None:
    """Train and eval loss against step, one figure (headless matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.exists(metrics_path):
        return
    rows = [json.loads(line) for line in open(metrics_path)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train loss"), ("ce", "train CE"), ("eval_loss", "held-out CE")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
