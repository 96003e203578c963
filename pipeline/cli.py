"""The kdcache command line: thin. Each command parses flags and calls one plain function.

Torch and transformers are imported inside the commands that need them, so `inspect` and `verify` stay fast.
Domain errors (ValueError subclasses, missing files) become one-line `click.ClickException`s here and nowhere else.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from storage.format import CacheError


def domain_errors(fn):
    """Turn expected failures into a one-line message and a non-zero exit, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (CacheError, ValueError, FileNotFoundError, IndexError, OSError) as e:
            raise click.ClickException(" ".join(str(e).split()) or type(e).__name__) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """kdcache: run the teacher once, cache what it knows, train many students from the cache."""


@main.command()
@click.argument("teacher")
@click.argument("data")
@click.option("-o", "--output", required=True, help="Cache directory to write.")
@click.option("--revision", default=None, help="Hub revision of the teacher.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="auto: bf16 on CUDA, fp32 on CPU.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--split", default="train", show_default=True)
@click.option("--text-field", default="text", show_default=True)
@click.option("--messages-field", default="messages", show_default=True, help="Chat column, used when there is no text column.")
@click.option("--txt-sample-by", type=click.Choice(["document", "paragraph", "line"]), default="document",
              show_default=True, help="How .txt files are split into rows.")
@click.option("--limit", type=int, default=None, help="Use the first N rows only.")
@click.option("--max-length", type=int, default=None, help="Sequence length (default: teacher context, at most 2048).")
@click.option("--pack", is_flag=True, help="Concatenate short documents (EOS-separated) into full-length rows.")
@click.option("--mode", type=click.Choice(["topk", "sample"]), default="topk", show_default=True)
@click.option("--top-k", type=int, default=64, show_default=True)
@click.option("--draws", type=int, default=50, show_default=True, help="Draws per position in sample mode.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-tokens", type=int, default=16_384, show_default=True, help="Padded tokens per teacher batch.")
@click.option("--unit-rows", type=int, default=2_048, show_default=True, help="Sequences per work unit (= shard).")
@click.option("--overwrite", is_flag=True, help="Replace a cache written with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--num-proc", type=int, default=None, help="Tokenizer processes.")
@domain_errors
def capture(teacher: str, data: str, output: str, **flags) -> None:
    """Teacher-forced top-k or sampled distributions of TEACHER over DATA, written to a cache."""
    from pipeline.capture import CaptureConfig
    from pipeline.capture import capture as run_capture

    result = run_capture(CaptureConfig(teacher=teacher, data=data, output=output, **flags))
    if result.already_complete:
        click.echo(f"{output} is already complete; nothing to do (use --overwrite to capture again)")
    elif result.stats:
        click.echo(f"{output}: {result.rows:,} rows, {result.tokens:,} tokens in {result.seconds:.1f}s "
                   f"({result.stats['tokens_per_s']:,.0f} tok/s), padding {result.padding_fraction:.1%}, "
                   f"{result.empty_rows} empty rows skipped")


@main.command()
@click.argument("teacher")
@click.argument("prompts")
@click.option("-o", "--output", required=True, help="Cache directory to write.")
@click.option("--revision", default=None)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--split", default="train", show_default=True)
@click.option("--prompt-field", default="text", show_default=True)
@click.option("--messages-field", default="messages", show_default=True, help="Chat prompts, used when there is no prompt column.")
@click.option("--limit", type=int, default=None, help="Use the first N prompts only.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--max-prompt-length", type=int, default=None, help="Longer prompts keep their last tokens.")
@click.option("--num-samples", type=int, default=1, show_default=True, help="Sequences per prompt.")
@click.option("--greedy", is_flag=True, help="Greedy decoding (default: sampling).")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k-sampling", type=int, default=0, show_default=True, help="Top-k filter while sampling (0: none).")
@click.option("--num-beams", type=int, default=1, show_default=True)
@click.option("--mode", type=click.Choice(["topk", "sample"]), default="topk", show_default=True, help="What is stored.")
@click.option("--top-k", type=int, default=64, show_default=True)
@click.option("--draws", type=int, default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Prompts per generate call.")
@click.option("--unit-rows", type=int, default=256, show_default=True, help="Prompts per work unit (= shard).")
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", is_flag=True)
@domain_errors
def generate(teacher: str, prompts: str, output: str, **flags) -> None:
    """Teacher-generated continuations of PROMPTS (sequence-level KD), with the teacher's distributions."""
    from pipeline.generate import GenerateConfig
    from pipeline.generate import generate as run_generate

    result = run_generate(GenerateConfig(teacher=teacher, prompts=prompts, output=output, **flags))
    if result.already_complete:
        click.echo(f"{output} is already complete; nothing to do (use --overwrite to generate again)")
    elif result.stats:
        click.echo(f"{output}: {result.rows:,} sequences, {result.stats['generated_tokens']:,} generated tokens in "
                   f"{result.seconds:.1f}s")


@main.command()
@click.argument("caches", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="RUN directory: the student, checkpoints, metrics.")
@click.option("--student", required=True, help="Pretrained model, or a config.json / folder with a config to start fresh.")
@click.option("--loss", default="fkl", show_default=True, help="fkl, rkl, skl, srkl, jsd, tvd or akl.")
@click.option("--tail", default="ghost", show_default=True, help="Top-k tail: ghost, renorm or label.")
@click.option("--ce-weight", type=float, default=0.5, show_default=True, help="Weight of CE on the ground truth.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--beta", type=float, default=0.5, show_default=True, help="Generalised JSD mixture.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Rows per device batch.")
@click.option("--max-steps", type=int, default=None)
@click.option("--epochs", type=float, default=None)
@click.option("--grad-accum", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--warmup", type=int, default=None, help="Warm-up steps.")
@click.option("--weight-decay", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--save-steps", type=int, default=None)
@click.option("--eval-steps", type=int, default=None)
@click.option("--logging-steps", type=int, default=None)
@click.option("--bf16", is_flag=True, default=None)
@click.option("--num-workers", type=int, default=None, help="DataLoader workers.")
@click.option("--eval-data", default=None, help="Held-out text evaluated during training.")
@click.option("--max-eval-rows", type=int, default=None)
@click.option("--trainer-args", default=None, help="JSON or YAML file of further TrainingArguments fields.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in RUN.")
@click.option("--overwrite", is_flag=True, help="Replace the run in RUN.")
@click.option("--allow-mixed-teachers", is_flag=True)
@click.option("--report-to", default="none", show_default=True, help="none, tensorboard, wandb ...")
@click.option("--quiet", is_flag=True)
@domain_errors
def train(caches: tuple[str, ...], output: str, **flags) -> None:
    """Train a student from one or more CACHES (each optionally PATH:WEIGHT)."""
    from pipeline.train import TrainConfig
    from pipeline.train import train as run_train

    summary = run_train(TrainConfig(caches=list(caches), output=output, **flags))
    metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in summary["final_metrics"].items())
    click.echo(f"student saved in {output}: {metrics}")


@main.command(name="eval")
@click.argument("model")
@click.argument("data", required=False)
@click.option("--cache", default=None, help="A cache of DATA: adds the KL from its teacher.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-length", type=int, default=None)
@click.option("--limit", type=int, default=None, help="Evaluate at most N sequences of DATA, spread over the text.")
@click.option("--device", default="auto", show_default=True)
@domain_errors
def eval_(model: str, data: str | None, cache: str | None, as_json: bool, **flags) -> None:
    """Perplexity of MODEL on DATA, and KL to the teacher where a cache is given."""
    from pipeline.evaluate import evaluate

    result = evaluate(model, data, cache, **flags)
    if as_json:
        click.echo(json.dumps(result))
    else:
        kl = "" if result["kl_to_teacher"] is None else f"  KL to teacher {result['kl_to_teacher']:.4f}"
        click.echo(f"perplexity {result['perplexity']:.3f} over {result['tokens']:,} tokens{kl}")


@main.command()
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@domain_errors
def inspect(cache: str, as_json: bool) -> None:
    """Summary of CACHE: teacher, tokenizer, mode, rows, tokens, bytes per token, shards."""
    from storage.verify import format_summary, summarize

    s = summarize(cache)
    click.echo(json.dumps(s, indent=2) if as_json else format_summary(s))


@main.command()
@click.argument("cache", type=click.Path())
@click.option("--row", default=0, show_default=True, help="Row index to show.")
@click.option("--top", default=5, show_default=True, help="Alternatives shown per position.")
@click.option("--tokenizer", default=None, help="Tokenizer to decode with (default: the one the cache records).")
@click.option("--max-tokens", default=200, show_default=True, help="Positions shown at most.")
@domain_errors
def show(cache: str, row: int, top: int, tokenizer: str | None, max_tokens: int) -> None:
    """One row of CACHE decoded: each token with the teacher's top alternatives and their probabilities."""
    from pipeline.show import format_row

    click.echo(format_row(cache, row, top=top, tokenizer=tokenizer, max_tokens=max_tokens))


@main.command()
@click.argument("cache", type=click.Path())
@domain_errors
def verify(cache: str) -> None:
    """Re-hash every shard of CACHE and check every invariant; exit 1 with one line per fault."""
    from storage.verify import verify_cache

    faults = verify_cache(cache)
    if faults:
        for f in faults:
            click.echo(f"FAULT {f}", err=True)
        click.echo(f"{cache}: {len(faults)} fault(s)", err=True)
        sys.exit(1)
    click.echo(f"{cache}: OK")


@main.command()
@click.option("-o", "--output", default="runs/demo", show_default=True, help="RUN directory for caches, students, report.")
@click.option("--steps", type=int, default=None, help="Training steps per student (default: the recipe's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--verbose", is_flag=True, help="Progress bars and training logs.")
@domain_errors
def demo(output: str, steps: int | None, seed: int, verbose: bool) -> None:
    """The whole flow on the embedded default: the Shakespeare teacher and corpus shipped in data/."""
    from pipeline.demo import DemoConfig, format_report
    from pipeline.demo import demo as run_demo

    cfg = DemoConfig(output=output, seed=seed, quiet=not verbose)
    if steps is not None:
        cfg.steps = steps
    report = run_demo(cfg)
    click.echo(format_report(report))
    click.echo(f"written: {output}/report.json, {output}/report.md, {output}/curves.png")


if __name__ == "__main__":
    main()
