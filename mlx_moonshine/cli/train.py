"""Adapting a model: `train` (a LoRA/DoRA run folder with its report), and `quickstart`, the whole job
on the bundled example."""

from __future__ import annotations

from pathlib import Path

import click

from .common import decoding_from_kwargs, decoding_options, run, verdict_options


@click.command("train")
@click.option("--model", default=None, help="Base MLX model folder.")
@click.option("--train", "train", default=None, type=click.Path(path_type=Path), help="Training manifest.")
@click.option("--val", default=None, type=click.Path(path_type=Path), help="Validation manifest (loss, WER, early stop).")
@click.option("--heldout", default=None, type=click.Path(path_type=Path),
              help="General-speech manifest: its loss is tracked, and it is evaluated before/after.")
@click.option("--eval-test", default=None, type=click.Path(path_type=Path),
              help="Domain test manifest evaluated before/after for report.md.")
@click.option("--replay", default=None, type=click.Path(path_type=Path),
              help="General-speech manifest mixed into every batch (default: the bundled general-English set, "
                   "270 clips; 'none' turns replay off).")
@click.option("--replay-ratio", default=None, type=click.FloatRange(0, 1, max_open=True),
              help="Share of training rows drawn from the replay set (default 0.5; 0: off).")
@click.option("--replay-targets", default=None, type=click.Choice(["base", "manifest"]),
              help="Who writes the replay targets: the frozen base model's own transcripts (default: keeps its "
                   "words, casing and punctuation on general speech) or the replay manifest's texts.")
@click.option("--replay-kd", default=None, type=click.FloatRange(min=0),
              help="Weight of the distillation term toward the base's token distribution on replay rows "
                   "(default 2.0; 0: off).")
@click.option("--transcript-style", default=None, type=click.Choice(["base", "domain"]),
              help="Outside the domain: keep the base's casing/punctuation (default) or adopt the domain's "
                   "style (lowercase, no punctuation) everywhere.")
@click.option("--canary", default=None,
              help="Real general-speech manifest evaluated before/after (default: the real-speech canary "
                   "fetched from PyPI, or $MLX_MOONSHINE_CANARY; 'none': off, and the verdict cannot be yes).")
@click.option("--baseline-run", default=None, type=click.Path(path_type=Path),
              help="Existing `eval` run of the base model to use as the baseline (same decoding options).")
@click.option("-c", "--config", "config_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="YAML with any of these options (CLI > YAML > defaults).")
@click.option("-o", "--out", default=None, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--max-steps", default=None, type=click.IntRange(min=1))
@click.option("--lr", default=None, type=float)
@click.option("--batch-size", default=None, type=click.IntRange(min=1))
@click.option("--grad-accum", default=None, type=click.IntRange(min=1))
@click.option("--warmup-steps", default=None, type=click.IntRange(min=0))
@click.option("--schedule", default=None, type=click.Choice(["cosine", "linear", "constant"]))
@click.option("--rank", default=None, type=click.IntRange(min=1))
@click.option("--alpha", default=None, type=float)
@click.option("--dropout", default=None, type=click.FloatRange(0, 1, max_open=True))
@click.option("--targets", default=None, help="Comma list of layer names, e.g. q_proj,v_proj.")
@click.option("--scope", default=None, help="Comma list of encoder, decoder_self, decoder_cross.")
@click.option("--dora/--no-dora", default=None, help="DoRA instead of LoRA.")
@click.option("--init", default=None, help="default | pissa | pissa_niter_N")
@click.option("--seed", default=None, type=int)
@click.option("--eval-every", default=None, type=click.IntRange(min=1))
@click.option("--patience", default=None, type=click.IntRange(min=0), help="0: no early stopping.")
@click.option("--max-minutes", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Stop training after this many minutes (checked every step).")
@click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("--max-seconds", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Leave out training clips longer than this (default 30; max_seconds: null in YAML keeps all).")
@click.option("--augment", default=None, help="Comma list of noise, speed, timemask (default: off).")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None)
@click.option("--resume", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Continue the run in this folder exactly where its checkpoint stopped.")
@click.option("--fuse", is_flag=True, help="Also write RUN/fused: the base with the best adapter merged in.")
@click.option("--skip-invalid", is_flag=True, help="Leave bad manifest rows out instead of stopping.")
@click.option("--hypothesis", default=None, help="The hypothesis report.md states (default: a generic one).")
@verdict_options
@decoding_options
def train_cmd(config_file, resume, fuse, skip_invalid, **kwargs):
    """Train a LoRA/DoRA adapter; write adapters, checkpoints, metrics, plots and report.md into OUT."""
    decoding = decoding_from_kwargs(kwargs)
    from ..train.run import run_training

    kwargs = {k: (str(v) if isinstance(v, Path) else v) for k, v in kwargs.items()}
    result = run(run_training, kwargs, config_file=config_file, resume=resume, fuse=fuse, decoding=decoding,
                 skip_invalid=skip_invalid, log=lambda m: click.echo(m, err=True))
    for line in result["decision"]["lines"]:
        click.echo(line)
    click.echo(f"report: {result['report']}")


@click.command()
@click.option("-o", "--out", "out_dir", default="runs/quickstart", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Everything goes here; re-running reuses it.")
@click.option("--minutes", default=12.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Training time budget (the whole quickstart takes ~8 minutes more).")
@click.option("--steps", default=300, show_default=True, type=click.IntRange(min=1), help="Planned training steps.")
@click.option("--data", "data_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="A folder laid out like examples/atc (default: the bundled example).")
@click.option("--model", "model_source", default=None,
              help="Any `convert` SOURCE (default: the Hub's moonshine-tiny, else the same tiny from PyPI, "
                   "moonshine-voice:tiny-en).")
def quickstart(out_dir, minutes, steps, data_dir, model_source):
    """The main job end to end on the bundled ATC example: baseline, LoRA, tuned eval, compare, report, PEFT."""
    from ..quickstart import quickstart as _quickstart

    run(_quickstart, out_dir, minutes=minutes, steps=steps, data_dir=data_dir, model_source=model_source,
        log=lambda m: click.echo(m))
