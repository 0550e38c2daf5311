"""What the commands share: the one error boundary (`run`) and the option blocks several commands take.

Nothing here imports MLX: the option blocks are read for every `--help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import MoonshineError


def run(fn, *args, **kwargs):
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


def out_dir_option(help_text: str):
    """`-o/--out OUT`, the folder a command writes (required); `help_text` says what goes there."""
    return click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
                        help=help_text)


def decoding_options(fn):
    """The shared decoding flags (transcribe, eval, train); their defaults are DecodingOptions' own."""
    from ..options import DecodingOptions as D  # no MLX: --help stays instant

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


def warn_budget(options, model) -> None:
    """Say so on stderr when the token budget is too small for the model (`decoding.budget_warning`)."""
    from ..decoding import budget_warning

    if (w := budget_warning(options, model)) is not None:
        click.echo(f"warning: {w}", err=True)


def decoding_from_kwargs(kwargs: dict):
    """Pop the decoding options from kwargs into a validated `DecodingOptions`."""
    from dataclasses import fields

    from ..options import DecodingOptions

    return run(DecodingOptions, **{f.name: kwargs.pop(f.name) for f in fields(DecodingOptions)})


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


def thresholds(kwargs: dict):
    """Pop the verdict options from kwargs into a `verdict.Thresholds` (defaults where not given)."""
    from ..eval.verdict import Thresholds

    names = dict(domain_target="domain_min_reduction", max_heldout_regression="heldout_max_rise",
                 max_canary_regression="canary_max_rise", max_format_drift="format_drift_max")
    given = {field: kwargs.pop(opt) for opt, field in names.items() if opt in kwargs}
    return Thresholds(**{k: v for k, v in given.items() if v is not None})
