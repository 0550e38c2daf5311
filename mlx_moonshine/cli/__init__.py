"""The `mlx-moonshine` command line: validate arguments, import lazily, call the library.

No logic lives here. Every command turns a `MoonshineError` into one line on stderr
and exit code 2 (see `common.run`). This module is the group; the commands live one
module per job (inference, eval, train, manifest, export) and import the library only
when they run, so `--help` imports no MLX.
"""

from __future__ import annotations

import warnings

import click

from .. import __version__
from .._blas import describe as _blas_description
from .eval import compare_cmd, eval_cmd
from .export import export_group, fuse_cmd, import_group
from .inference import convert, transcribe
from .manifest import manifest_group
from .train import quickstart, train_cmd


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


for _command in (convert, transcribe, eval_cmd, compare_cmd, train_cmd, manifest_group, export_group, import_group,
                 fuse_cmd, quickstart):
    main.add_command(_command)
