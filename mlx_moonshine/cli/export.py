"""Moving models and adapters out and in: `export peft|hf|runtime`, `import peft`, `fuse`."""

from __future__ import annotations

from pathlib import Path

import click

from .common import out_dir_option, run


@click.group("export")
def export_group():
    """Export adapters and merged models: PyTorch (PEFT, Hugging Face transformers), Moonshine's runtime."""


def _verify_audio_option(fn):
    return click.option("--audio", default=None, type=click.Path(dir_okay=False, path_type=Path),
                        help="Clip for --verify (default: 3 s of seeded noise); also compares greedy text.")(fn)


@export_group.command("peft")
@click.argument("source", metavar="RUN_OR_ADAPTER", type=click.Path(path_type=Path))
@out_dir_option("PEFT adapter folder to write.")
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
    from ..export.peft import export_peft

    if verify:
        from ..export.verify import require_torch

        run(require_torch, need_peft=True)
    out = run(export_peft, source, out_dir, base_model_name_or_path, best=best, force=force, model_dir=model_path)
    click.echo(f"wrote {out}", err=True)
    if verify:
        from ..export.verify import verify_peft

        r = run(verify_peft, model_path, source, out, best=best, audio=audio)
        click.echo(f"PEFT parity: max |logits diff| {r['unmerged']:.2e} unmerged, {r['merged']:.2e} "
                   "after merge_and_unload (limit 1e-3)")


@export_group.command("hf")
@click.option("--model", "model_path", required=True, help="MLX model folder (or HF checkpoint / Hub id).")
@click.option("--adapter", default=None, type=click.Path(path_type=Path), help="Training run or adapter folder to merge in.")
@out_dir_option("Hugging Face checkpoint folder to write.")
@click.option("--verify", is_flag=True, help="Load the export with transformers and compare logits with MLX (needs torch).")
@_verify_audio_option
@click.option("--force", is_flag=True, help="Overwrite OUT if it is not empty.")
def export_hf_cmd(model_path, adapter, out_dir, verify, audio, force):
    """Write a transformers checkpoint (MoonshineForConditionalGeneration + processor files)."""
    from ..export.hf import export_hf

    if verify:
        from ..export.verify import require_torch

        run(require_torch)
    out = run(export_hf, model_path, out_dir, adapter=adapter, force=force)
    click.echo(f"wrote {out}", err=True)
    if verify:
        from ..export.verify import verify_hf

        r = run(verify_hf, out, model_path, adapter, audio=audio)
        click.echo(f"transformers parity: max |logits diff| {r['logits']:.2e} (limit 1e-3)")
        if "mlx_text" in r:
            click.echo(f"greedy transcript (both): {r['mlx_text']}")


@export_group.command("runtime")
@click.option("--model", "model_path", required=True,
              help="MLX model folder converted from moonshine-cpp:base-en or moonshine-voice:tiny-en.")
@click.option("--adapter", default=None, type=click.Path(path_type=Path), help="Training run or adapter folder to merge in.")
@out_dir_option("Runtime model folder to write (encoder_model.ort, decoder_model_merged.ort, tokenizer.bin).")
@click.option("--verify", is_flag=True, help="Transcribe a clip with onnxruntime (and moonshine_cpp if installed) "
                                             "over OUT and with MLX, and compare.")
@click.option("--audio", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Clip for --verify (default: moonshine-voice's beckett.wav where installed).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it is not empty.")
def export_runtime_cmd(model_path, adapter, out_dir, verify, audio, force):
    """Write a model folder for Moonshine's own runtime (moonshine-cpp, moonshine-voice), adapter merged, int8."""
    from ..export.runtime import export_runtime

    if verify and audio is None:
        from ..export.ort_runtime import default_clip

        audio = run(default_clip)
    record = run(export_runtime, model_path, out_dir, adapter=adapter, force=force,
                 log=lambda m: click.echo(m, err=True))
    if verify:
        from ..export.ort_runtime import verify_runtime

        r = run(verify_runtime, out_dir, model_path, adapter, audio=audio, architecture=record["architecture"])
        click.echo(f"MLX:          {r['mlx']}")
        click.echo(f"onnxruntime:  {r['onnxruntime']}")
        if r["moonshine_cpp"] is not None:
            click.echo(f"moonshine_cpp: {r['moonshine_cpp']}")
        click.echo("same words" if r["wer"] == 0 else f"WER of onnxruntime vs MLX: {100 * r['wer']:.1f}%")


@click.group("import")
def import_group():
    """Import adapters trained elsewhere (PEFT) into mlx-moonshine's adapter format."""


@import_group.command("peft")
@click.argument("peft_dir", metavar="DIR", type=click.Path(path_type=Path))
@out_dir_option("Adapter folder to write.")
@click.option("--model", "model_path", default=None, help="Base MLX model folder to check the adapter's shapes against.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it is not empty.")
def import_peft_cmd(peft_dir, out_dir, model_path, force):
    """Convert the PEFT LoRA/DoRA adapter in DIR into an mlx-moonshine adapter folder."""
    from ..export.peft import import_peft

    click.echo(f"wrote {run(import_peft, peft_dir, out_dir, force=force, model_dir=model_path)}", err=True)


@click.command("fuse")
@click.option("--model", "model_path", required=True, help="Base MLX model folder (or HF checkpoint / Hub id).")
@click.option("--adapter", required=True, type=click.Path(path_type=Path), help="Training run or adapter folder.")
@out_dir_option("MLX model folder to write.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it is not empty.")
def fuse_cmd(model_path, adapter, out_dir, force):
    """Merge an adapter into the base weights: an MLX model folder that needs no adapter."""
    from ..export.hf import fuse

    click.echo(f"wrote {run(fuse, model_path, adapter, out_dir, force=force)}", err=True)
