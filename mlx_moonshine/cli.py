"""The `mlx-moonshine` command line: validate arguments, import lazily, call the library.

No logic lives here. Every command turns a `MoonshineError` into one line on stderr
and exit code 2 (see `_run`).
"""

from __future__ import annotations

import sys
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


@main.command()
@click.argument("source")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="MLX model folder to write.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def convert(source, out_dir, dtype, force):
    """Convert SOURCE to an MLX model folder.

    SOURCE is a local Hugging Face checkpoint folder, a Hub repo id (UsefulSensors/moonshine-tiny), a folder
    with Moonshine ONNX/ORT files, or moonshine-cpp:base-en (real base weights from PyPI).
    """
    from .loading import convert as _convert

    _run(_convert, source, out_dir, dtype=dtype, force=force, log=lambda m: click.echo(m, err=True))


def decoding_options(fn):
    """The shared decoding flags (transcribe, eval, train)."""
    opts = [
        click.option("--beam-size", default=1, show_default=True, type=click.IntRange(min=1),
                     help="1 = greedy."),
        click.option("--length-penalty", default=None, type=float, help="Beam ranking; default: mean log-prob."),
        click.option("--max-tokens-per-second", default=6.5, show_default=True, type=float,
                     help="Token budget per second of audio (stops runaway loops)."),
        click.option("--max-new-tokens", default=224, show_default=True, type=click.IntRange(min=1)),
        click.option("--no-repeat-ngram-size", default=0, show_default=True, type=click.IntRange(min=0)),
        click.option("--suppress-blank", is_flag=True, help="Forbid an empty transcript."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _decoding_from_kwargs(kwargs: dict):
    from .decoding import DecodingOptions

    keys = ("beam_size", "length_penalty", "max_tokens_per_second", "max_new_tokens",
            "no_repeat_ngram_size", "suppress_blank")
    return _run(DecodingOptions, **{k: kwargs.pop(k) for k in keys})


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
    from .audio import prepare_audio
    from .loading import load
    from .transcribe import transcribe_clips

    model, processor = _run(load, model_path, adapter=adapter)
    # Read every file first, so a bad file fails before any decoding.
    arrays = [_run(prepare_audio, p, processor.audio) for p in audio]
    results = _run(transcribe_clips, model, processor, arrays, options, batch_size)
    for path, res in zip(audio, results):
        if as_json:
            click.echo(json.dumps({"audio": str(path), **res, "decoding": options.to_dict(),
                                   "audio_normalization": processor.audio.to_dict()}))
        else:
            click.echo(res["text"])


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
def manifest_split_cmd(manifest_path, ratios, by, quick, seed, skip_invalid, out_dir):
    """Split MANIFEST into train/val/test JSONL files in OUT_DIR (deterministic per seed)."""
    from .data import load_manifest, split_manifest

    m = _run(load_manifest, manifest_path, skip_invalid=skip_invalid)
    written = _run(split_manifest, m, out_dir, ratios=ratios, by=by, quick=quick, seed=seed)
    if m.skipped:
        click.echo(f"skipped {len(m.skipped)} bad rows", err=True)
    for name, path in written.items():
        n = sum(1 for line in open(path, encoding="utf-8") if line.strip())
        click.echo(f"{name:6s} {n:6d} rows  {path}")


def _cmd_main():  # pragma: no cover - entry point used by `python -m mlx_moonshine`
    main()
