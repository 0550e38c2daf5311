"""The `mlx-moonshine` command line: validate arguments, import lazily, call the library.

No logic lives here. Every command turns a `MoonshineError` into one line on stderr
and exit code 2 (see `_run`).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from . import __version__
from ._blas import describe as _blas_description
from .errors import MoonshineError


def _run(fn, *args, **kwargs):
    """Call a library function; user errors become one clear line and exit 2."""
    try:
        return fn(*args, **kwargs)
    except MoonshineError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        # Disk full, permission denied...: name the file and stop cleanly.
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        click.echo(f"error: {e.strerror or e}{where}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    __version__,
    message=f"mlx-moonshine %(version)s (BLAS: {_blas_description()})",
)
def main():
    """Moonshine speech recognition in MLX: convert, transcribe, evaluate, adapt (LoRA/DoRA), export."""
    warnings.showwarning = _show_warning


_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Our own warnings (truncated audio...) as one "warning: ..." line; others as Python prints them."""
    if category.__module__.startswith("mlx_moonshine"):
        click.echo(f"warning: {message}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


@main.command()
@click.argument("source")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="MLX model folder to write.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--normalize", type=click.Choice(["none", "rms"]), default=None,
              help="Audio normalisation the model expects, stored in preprocessor_config.json and applied by "
                   "transcribe, eval and train alike (default: the source's; upstream Moonshine: none).")
@click.option("--target-dbfs", default=-20.0, show_default=True, type=float,
              help="RMS level for --normalize rms, in dB relative to full scale.")
def convert(source, out_dir, dtype, force, normalize, target_dbfs):
    """Convert SOURCE to an MLX model folder.

    SOURCE is a local Hugging Face checkpoint folder, a Hub repo id (UsefulSensors/moonshine-tiny), a folder
    with Moonshine ONNX/ORT files, or real weights from PyPI: moonshine-cpp:base-en (base),
    moonshine-voice:tiny-en (tiny).
    """
    from .audio import AudioConfig
    from .loading import convert as _convert

    audio = None if normalize is None else AudioConfig(normalize=None if normalize == "none" else normalize,
                                                       target_rms_dbfs=target_dbfs)
    _run(_convert, source, out_dir, dtype=dtype, force=force, log=lambda m: click.echo(m, err=True), audio=audio)


def decoding_options(fn):
    """The shared decoding flags (transcribe, eval, train); their defaults are DecodingOptions' own."""
    from .options import DecodingOptions as D  # no MLX: --help stays instant

    opts = [
        click.option("--beam-size", default=D.beam_size, show_default=True, type=click.IntRange(min=1),
                     help="1 = greedy."),
        click.option("--length-penalty", default=D.length_penalty, type=float,
                     help="Beam ranking; default: mean log-prob."),
        click.option("--max-tokens-per-second", default=D.max_tokens_per_second, show_default=True, type=float,
                     help="Token budget per second of audio (stops runaway loops)."),
        click.option("--min-token-budget", default=D.min_token_budget, show_default=True,
                     type=click.IntRange(min=1), help="Budget floor for very short clips."),
        click.option("--max-new-tokens", default=D.max_new_tokens, show_default=True, type=click.IntRange(min=1)),
        click.option("--no-repeat-ngram-size", default=D.no_repeat_ngram_size, show_default=True,
                     type=click.IntRange(min=0)),
        click.option("--suppress-blank", is_flag=True, default=D.suppress_blank, help="Forbid an empty transcript."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _warn_budget(options, model) -> None:
    from .decoding import budget_warning

    if (w := budget_warning(options, model)) is not None:
        click.echo(f"warning: {w}", err=True)


def _decoding_from_kwargs(kwargs: dict):
    from .options import DecodingOptions

    from dataclasses import fields

    return _run(DecodingOptions, **{f.name: kwargs.pop(f.name) for f in fields(DecodingOptions)})


@main.command()
@click.option("--model", "model_path", required=True, help="MLX model folder (or HF checkpoint / Hub id).")
@click.option("--adapter", default=None, type=click.Path(path_type=Path),
              help="Training run or adapter folder to apply.")
@click.argument("audio", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@decoding_options
def transcribe(model_path, adapter, audio, as_json, batch_size, **kwargs):
    """Transcribe AUDIO files (wav/flac/ogg/mp3, any rate): one line of text per file."""
    import json

    options = _decoding_from_kwargs(kwargs)
    from .loading import load
    from .transcription import transcribe_clips

    model, processor = _run(load, model_path, adapter=adapter)
    _warn_budget(options, model)
    results = _run(transcribe_clips, model, processor, list(audio), options, batch_size)
    for path, res in zip(audio, results):
        for w in res.get("warnings", []):
            click.echo(f"warning: {w}", err=True)
        if as_json:
            click.echo(json.dumps({"audio": str(path), **res, "decoding": options.to_dict(),
                                   "audio_normalization": processor.audio.to_dict()}))
        else:
            click.echo(res["text"])


@main.command("eval")
@click.option("--model", "model_path", required=True, help="MLX model folder (or HF checkpoint / Hub id).")
@click.option("--adapter", default=None, type=click.Path(path_type=Path),
              help="Training run or adapter folder to apply.")
@click.option("--manifest", "manifests", multiple=True, required=True, type=click.Path(path_type=Path),
              help="JSONL/CSV/TSV manifest; repeat for several.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder (resumed if it holds an interrupted run with the same settings).")
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
    options = _decoding_from_kwargs(kwargs)
    from .eval.canary import resolve_canary
    from .data import load_manifest
    from .eval.evaluate import evaluate, format_summary
    from .loading import load, resolve_model_dir

    canary_path, _ = resolve_canary(canary, log=lambda m: click.echo(m, err=True))
    if canary_path is not None and Path(canary_path).resolve() not in {Path(m).resolve() for m in manifests}:
        manifests = (*manifests, Path(canary_path))

    # Validate the manifests before the (slow) model load; evaluate() loads them again.
    for m in manifests:
        _run(load_manifest, m, skip_invalid=skip_invalid)
    model, processor = _run(load, model_path, adapter=adapter)
    _warn_budget(options, model)
    summary = _run(evaluate, model, processor, list(manifests), out_dir, options=options, batch_size=batch_size,
                   skip_invalid=skip_invalid, model_path=_run(resolve_model_dir, model_path),
                   adapter_path=adapter, progress=not quiet, limit=limit, force=force)
    click.echo(format_summary(summary))
    click.echo(f"wrote {out_dir}", err=True)


def verdict_options(fn):
    """The thresholds of the one verdict rule (verdict.py), shared by compare and train."""
    opts = [
        click.option("--domain-target", default=None, type=click.FloatRange(0, 1),
                     help="Required relative reduction of the pooled domain WER, e.g. 0.75 for -75% "
                          "(default 0: must not get worse)."),
        click.option("--max-heldout-regression", default=None, type=click.FloatRange(min=0),
                     help="Largest allowed held-out WER increase, absolute points (default 1.0)."),
        click.option("--max-canary-regression", default=None, type=click.FloatRange(min=0),
                     help="Largest allowed real-canary WER increase, absolute points (default 1.0)."),
        click.option("--max-format-drift", default=None, type=click.FloatRange(0, 1),
                     help="Largest allowed share of held-out/canary utterances whose casing/punctuation "
                          "differs from the base's (default 0.05)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _thresholds(kwargs: dict):
    """Pop the verdict options from kwargs into a `verdict.Thresholds` (defaults where not given)."""
    from .eval.verdict import Thresholds

    names = dict(domain_target="domain_min_reduction", max_heldout_regression="heldout_max_rise",
                 max_canary_regression="canary_max_rise", max_format_drift="format_drift_max")
    given = {field: kwargs.pop(opt) for opt, field in names.items() if opt in kwargs}
    return Thresholds(**{k: v for k, v in given.items() if v is not None})


@main.command("compare")
@click.argument("run_a", type=click.Path(path_type=Path))
@click.argument("run_b", type=click.Path(path_type=Path))
@verdict_options
@click.option("--heldout", default=None, help="Held-out manifest name (default: names containing 'heldout').")
@click.option("--canary", default=None, help="Real-speech canary manifest name (default: names containing 'canary').")
def compare_cmd(run_a, run_b, heldout, canary, **kwargs):
    """Compare eval run RUN_B against RUN_A; exit 0 if the verdict is PASS, 1 if FAIL or NOT MEASURED."""
    from .eval.compare import compare_runs

    report, ok = _run(compare_runs, run_a, run_b, heldout=heldout, canary=canary, thresholds=_thresholds(kwargs))
    click.echo(report)
    sys.exit(0 if ok else 1)


@main.command("train")
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
    decoding = _decoding_from_kwargs(kwargs)
    from .train.run import run_training

    kwargs = {k: (str(v) if isinstance(v, Path) else v) for k, v in kwargs.items()}
    result = _run(run_training, kwargs, config_file=config_file, resume=resume, fuse=fuse, decoding=decoding,
                  skip_invalid=skip_invalid, log=lambda m: click.echo(m, err=True))
    for line in result["decision"]["lines"]:
        click.echo(line)
    click.echo(f"report: {result['report']}")


def _parse_ratios(ctx, param, value: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(v) for v in value.replace(",", "/").split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not like 80/10/10") from None
    if len(ratios) not in (2, 3) or any(r < 0 for r in ratios) or ratios[0] <= 0:
        raise click.BadParameter(f"{value!r}: give 2 or 3 non-negative numbers with train > 0, like 80/10/10")
    return ratios


@main.group()
def manifest():
    """Inspect and split JSONL/CSV/TSV manifests ({"audio": path, "text": transcript})."""


@manifest.command("stats")
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(path_type=Path))
@click.option("--skip-invalid", is_flag=True, help="Leave bad rows out instead of stopping.")
def manifest_stats_cmd(manifest_path: Path, skip_invalid: bool):
    """Validate MANIFEST and print its size, hours, speakers and durations."""
    from .data import load_manifest, manifest_stats

    m = _run(load_manifest, manifest_path, skip_invalid=skip_invalid)
    stats = _run(manifest_stats, m)
    for key, value in stats.items():
        click.echo(f"{key:16s} {value:.3f}" if isinstance(value, float) else f"{key:16s} {value}")


@manifest.command("split")
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(path_type=Path))
@click.option("--ratios", default="80/10/10", show_default=True, callback=_parse_ratios,
              help="train/val/test sizes (relative), or train/val.")
@click.option("--by", type=click.Choice(["speaker"]), default=None,
              help="Keep each speaker in one split only.")
@click.option("--quick", default=50, show_default=True, type=click.IntRange(min=0),
              help="Rows in quick.jsonl, a random subset of train for smoke runs (0: none).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--skip-invalid", is_flag=True, help="Leave bad rows out instead of stopping.")
@click.option("-o", "--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Remove split files of an earlier split in OUT_DIR that this one "
                                            "would not rewrite.")
def manifest_split_cmd(manifest_path, ratios, by, quick, seed, skip_invalid, out_dir, force):
    """Split MANIFEST into train/val/test JSONL files in OUT_DIR (deterministic per seed)."""
    from .data import load_manifest
    from .splits import split_manifest

    m = _run(load_manifest, manifest_path, skip_invalid=skip_invalid)
    written = _run(split_manifest, m, out_dir, ratios=ratios, by=by, quick=quick, seed=seed, force=force)
    if m.skipped:
        click.echo(f"skipped {len(m.skipped)} bad rows", err=True)
    for name, path in written.items():
        n = sum(1 for line in open(path, encoding="utf-8") if line.strip())
        click.echo(f"{name:6s} {n:6d} rows  {path}")


@main.group("export")
def export_group():
    """Export adapters and merged models: PyTorch (PEFT, Hugging Face transformers), Moonshine's runtime."""


def _verify_audio_option(fn):
    return click.option("--audio", default=None, type=click.Path(dir_okay=False, path_type=Path),
                        help="Clip for --verify (default: 3 s of seeded noise); also compares greedy text.")(fn)


@export_group.command("peft")
@click.argument("source", metavar="RUN_OR_ADAPTER", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="PEFT adapter folder to write.")
@click.option("--base-model-name-or-path", default=None, help="Base model Hub id or path recorded for PyTorch users.")
@click.option("--best", is_flag=True, help="Export the run's best adapter (best/) instead of its final one.")
@click.option("--model", "model_path", default=None,
              help="Base MLX model folder: checks the adapter's shapes; required by --verify.")
@click.option("--verify", is_flag=True, help="Load the export with PEFT and compare logits with MLX (needs torch).")
@_verify_audio_option
@click.option("--force", is_flag=True, help="Overwrite OUT if it is not empty.")
def export_peft_cmd(source, out_dir, base_model_name_or_path, best, model_path, verify, audio, force):
    """Write RUN_OR_ADAPTER (a training run or adapter folder) as a PEFT LoRA/DoRA adapter."""
    if verify and model_path is None:
        raise click.UsageError("--verify needs --model DIR (the base model the adapter was trained on)")
    from .export.peft import export_peft

    if verify:
        from .export.verify import require_torch

        _run(require_torch, need_peft=True)
    out = _run(export_peft, source, out_dir, base_model_name_or_path, best=best, force=force, model_dir=model_path)
    click.echo(f"wrote {out}", err=True)
    if verify:
        from .export.verify import verify_peft

        r = _run(verify_peft, model_path, source, out, best=best, audio=audio)
        click.echo(f"PEFT parity: max |logits diff| {r['unmerged']:.2e} unmerged, {r['merged']:.2e} "
                   "after merge_and_unload (limit 1e-3)")


@export_group.command("hf")
@click.option("--model", "model_path", required=True, help="MLX model folder (or HF checkpoint / Hub id).")
@click.option("--adapter", default=None, type=click.Path(path_type=Path), help="Training run or adapter folder to merge in.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Hugging Face checkpoint folder to write.")
@click.option("--verify", is_flag=True, help="Load the export with transformers and compare logits with MLX (needs torch).")
@_verify_audio_option
@click.option("--force", is_flag=True, help="Overwrite OUT if it is not empty.")
def export_hf_cmd(model_path, adapter, out_dir, verify, audio, force):
    """Write a transformers checkpoint (MoonshineForConditionalGeneration + processor files)."""
    from .export.hf import export_hf

    if verify:
        from .export.verify import require_torch

        _run(require_torch)
    out = _run(export_hf, model_path, out_dir, adapter=adapter, force=force)
    click.echo(f"wrote {out}", err=True)
    if verify:
        from .export.verify import verify_hf

        r = _run(verify_hf, out, model_path, adapter, audio=audio)
        click.echo(f"transformers parity: max |logits diff| {r['logits']:.2e} (limit 1e-3)")
        if "mlx_text" in r:
            click.echo(f"greedy transcript (both): {r['mlx_text']}")


@export_group.command("runtime")
@click.option("--model", "model_path", required=True,
              help="MLX model folder converted from moonshine-cpp:base-en or moonshine-voice:tiny-en.")
@click.option("--adapter", default=None, type=click.Path(path_type=Path), help="Training run or adapter folder to merge in.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Runtime model folder to write (encoder_model.ort, decoder_model_merged.ort, tokenizer.bin).")
@click.option("--verify", is_flag=True, help="Transcribe a clip with onnxruntime (and moonshine_cpp if installed) "
                                             "over OUT and with MLX, and compare.")
@click.option("--audio", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Clip for --verify (default: moonshine-voice's beckett.wav where installed).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it is not empty.")
def export_runtime_cmd(model_path, adapter, out_dir, verify, audio, force):
    """Write a model folder for Moonshine's own runtime (moonshine-cpp, moonshine-voice), adapter merged, int8."""
    from .export.runtime import export_runtime

    if verify and audio is None:
        from .export.ort_runtime import default_clip

        audio = _run(default_clip)
    record = _run(export_runtime, model_path, out_dir, adapter=adapter, force=force,
                  log=lambda m: click.echo(m, err=True))
    if verify:
        from .export.ort_runtime import verify_runtime

        r = _run(verify_runtime, out_dir, model_path, adapter, audio=audio, architecture=record["architecture"])
        click.echo(f"MLX:          {r['mlx']}")
        click.echo(f"onnxruntime:  {r['onnxruntime']}")
        if r["moonshine_cpp"] is not None:
            click.echo(f"moonshine_cpp: {r['moonshine_cpp']}")
        click.echo("same words" if r["wer"] == 0 else f"WER of onnxruntime vs MLX: {100 * r['wer']:.1f}%")


@main.group("import")
def import_group():
    """Import adapters trained elsewhere (PEFT) into mlx-moonshine's adapter format."""


@import_group.command("peft")
@click.argument("peft_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Adapter folder to write.")
@click.option("--model", "model_path", default=None, help="Base MLX model folder to check the adapter's shapes against.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it is not empty.")
def import_peft_cmd(peft_dir, out_dir, model_path, force):
    """Convert the PEFT LoRA/DoRA adapter in DIR into an mlx-moonshine adapter folder."""
    from .export.peft import import_peft

    click.echo(f"wrote {_run(import_peft, peft_dir, out_dir, force=force, model_dir=model_path)}", err=True)


@main.command("fuse")
@click.option("--model", "model_path", required=True, help="Base MLX model folder (or HF checkpoint / Hub id).")
@click.option("--adapter", required=True, type=click.Path(path_type=Path), help="Training run or adapter folder.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="MLX model folder to write.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it is not empty.")
def fuse_cmd(model_path, adapter, out_dir, force):
    """Merge an adapter into the base weights: an MLX model folder that needs no adapter."""
    from .export.hf import fuse

    click.echo(f"wrote {_run(fuse, model_path, adapter, out_dir, force=force)}", err=True)


@main.command()
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
    from .quickstart import quickstart as _quickstart

    _run(_quickstart, out_dir, minutes=minutes, steps=steps, data_dir=data_dir, model_source=model_source,
         log=lambda m: click.echo(m))


def _cmd_main():  # pragma: no cover - entry point used by `python -m mlx_moonshine`
    main()
