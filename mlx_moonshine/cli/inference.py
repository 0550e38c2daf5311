"""Getting a model and using it: `convert` (any Moonshine checkpoint to an MLX model folder), `transcribe`."""

from __future__ import annotations

from pathlib import Path

import click

from .common import decoding_from_kwargs, decoding_options, out_dir_option, run, warn_budget


@click.command()
@click.argument("source")
@out_dir_option("MLX model folder to write.")
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
    from ..audio import AudioConfig
    from ..loading import convert as _convert

    audio = None if normalize is None else AudioConfig(normalize=None if normalize == "none" else normalize,
                                                       target_rms_dbfs=target_dbfs)
    run(_convert, source, out_dir, dtype=dtype, force=force, log=lambda m: click.echo(m, err=True), audio=audio)


@click.command()
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

    options = decoding_from_kwargs(kwargs)
    from ..loading import load
    from ..transcription import transcribe_clips

    model, processor = run(load, model_path, adapter=adapter)
    warn_budget(options, model)
    results = run(transcribe_clips, model, processor, list(audio), options, batch_size)
    for path, res in zip(audio, results):
        for w in res.get("warnings", []):
            click.echo(f"warning: {w}", err=True)
        if as_json:
            click.echo(json.dumps({"audio": str(path), **res, "decoding": options.to_dict(),
                                   "audio_normalization": processor.audio.to_dict()}))
        else:
            click.echo(res["text"])
