"""`manifest stats` and `manifest split`: a JSONL/CSV/TSV manifest checked, summed up, split."""

from __future__ import annotations

from pathlib import Path

import click

from .common import run


def _parse_ratios(ctx, param, value: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(v) for v in value.replace(",", "/").split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not like 80/10/10") from None
    if len(ratios) not in (2, 3) or any(r < 0 for r in ratios) or ratios[0] <= 0:
        raise click.BadParameter(f"{value!r}: give 2 or 3 non-negative numbers with train > 0, like 80/10/10")
    return ratios


@click.group("manifest")
def manifest_group():
    """Inspect and split JSONL/CSV/TSV manifests ({"audio": path, "text": transcript})."""


@manifest_group.command("stats")
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(path_type=Path))
@click.option("--skip-invalid", is_flag=True, help="Leave bad rows out instead of stopping.")
def manifest_stats_cmd(manifest_path: Path, skip_invalid: bool):
    """Validate MANIFEST and print its size, hours, speakers and durations."""
    from ..data import load_manifest, manifest_stats

    m = run(load_manifest, manifest_path, skip_invalid=skip_invalid)
    stats = run(manifest_stats, m)
    for key, value in stats.items():
        click.echo(f"{key:16s} {value:.3f}" if isinstance(value, float) else f"{key:16s} {value}")


@manifest_group.command("split")
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
    from ..data import load_manifest
    from ..splits import split_manifest

    m = run(load_manifest, manifest_path, skip_invalid=skip_invalid)
    written = run(split_manifest, m, out_dir, ratios=ratios, by=by, quick=quick, seed=seed, force=force)
    if m.skipped:
        click.echo(f"skipped {len(m.skipped)} bad rows", err=True)
    for name, path in written.items():
        n = sum(1 for line in open(path, encoding="utf-8") if line.strip())
        click.echo(f"{name:6s} {n:6d} rows  {path}")
