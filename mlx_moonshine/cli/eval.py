"""Measuring a model: `eval` (WER/CER over manifests into a run folder), `compare` (two runs, one verdict)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import (decoding_from_kwargs, decoding_options, out_dir_option, run, thresholds, verdict_options,
                     warn_budget)


@click.command("eval")
@click.option("--model", "model_path", required=True, help="MLX model folder (or HF checkpoint / Hub id).")
@click.option("--adapter", default=None, type=click.Path(path_type=Path),
              help="Training run or adapter folder to apply.")
@click.option("--manifest", "manifests", multiple=True, required=True, type=click.Path(path_type=Path),
              help="JSONL/CSV/TSV manifest; repeat for several.")
@out_dir_option("Run folder (resumed if it holds an interrupted run with the same settings).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@decoding_options
@click.option("--skip-invalid", is_flag=True, help="Leave bad rows and unreadable audio out instead of stopping.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Only the first N rows of each manifest.")
@click.option("--canary", default=None,
              help="Real general-speech manifest evaluated beside the others (default: the real-speech canary, "
                   "10 real recordings fetched from PyPI on first use, or $MLX_MOONSHINE_CANARY; 'none': off).")
@click.option("--force", is_flag=True, help="Discard an existing run made with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(model_path, adapter, manifests, out_dir, batch_size, skip_invalid, limit, canary, force, quiet,
             **kwargs):
    """Evaluate a model (and adapter) on manifests: predictions, WER/CER and run metadata into OUT.

    The real-speech canary is evaluated too unless --canary none: synthetic sets certify nothing about real voices.
    """
    options = decoding_from_kwargs(kwargs)
    from ..data import load_manifest
    from ..eval.canary import resolve_canary
    from ..eval.evaluate import evaluate, format_summary
    from ..loading import load, resolve_model_dir

    canary_path, _ = resolve_canary(canary, log=lambda m: click.echo(m, err=True))
    if canary_path is not None and Path(canary_path).resolve() not in {Path(m).resolve() for m in manifests}:
        manifests = (*manifests, Path(canary_path))

    # Validate the manifests before the (slow) model load; evaluate() loads them again.
    for m in manifests:
        run(load_manifest, m, skip_invalid=skip_invalid)
    model, processor = run(load, model_path, adapter=adapter)
    warn_budget(options, model)
    summary = run(evaluate, model, processor, list(manifests), out_dir, options=options, batch_size=batch_size,
                  skip_invalid=skip_invalid, model_path=run(resolve_model_dir, model_path),
                  adapter_path=adapter, progress=not quiet, limit=limit, force=force)
    click.echo(format_summary(summary))
    click.echo(f"wrote {out_dir}", err=True)


@click.command("compare")
@click.argument("run_a", type=click.Path(path_type=Path))
@click.argument("run_b", type=click.Path(path_type=Path))
@verdict_options
@click.option("--heldout", default=None, help="Held-out manifest name (default: names containing 'heldout').")
@click.option("--canary", default=None, help="Real-speech canary manifest name (default: names containing 'canary').")
def compare_cmd(run_a, run_b, heldout, canary, **kwargs):
    """Compare eval run RUN_B against RUN_A; exit 0 if the verdict is PASS, 1 if FAIL or NOT MEASURED."""
    from ..eval.compare import compare_runs

    report, ok = run(compare_runs, run_a, run_b, heldout=heldout, canary=canary, thresholds=thresholds(kwargs))
    click.echo(report)
    sys.exit(0 if ok else 1)
