"""Train/val/test splits of a manifest, by row or by speaker, deterministic per seed.

The splits are JSONL manifests (see data.py) written into one folder, plus `quick.jsonl`, a small subset
of train for smoke runs. Files of an earlier split that this one would not rewrite are refused (their
rows may overlap the new splits) unless `force` removes them.
"""

from __future__ import annotations

import random
from pathlib import Path

from .data import Manifest, as_manifest, write_manifest
from .errors import ManifestError

SPLIT_NAMES = ("train", "val", "test")


def _split_counts(n: int, ratios: list[float]) -> list[int]:
    total = sum(ratios)
    counts = [round(n * r / total) for r in ratios[:-1]]
    return counts + [n - sum(counts)]


def _row_groups(n: int, ratios: list[float], rng: random.Random) -> tuple[list[list[int]], str]:
    """Row indices shuffled and cut to the ratios; and what was split, for error messages."""
    order = list(range(n))
    rng.shuffle(order)
    groups, start = [], 0
    for c in _split_counts(n, ratios):
        groups.append(order[start:start + c])
        start += c
    return groups, f"{n} rows"


def _speaker_groups(m: Manifest, ratios: list[float], rng: random.Random) -> tuple[list[list[int]], str]:
    """Row indices grouped so that no speaker is in two splits; and what was split, for error messages."""
    order = range(len(m.samples))
    no_speaker = [i for i in order if m.samples[i].speaker is None]
    if no_speaker:
        raise ManifestError(f"{m.path}: {len(no_speaker)} rows have no 'speaker' (first: id "
                            f"'{m.samples[no_speaker[0]].id}'); add speakers or split without --by")
    by_spk: dict[str, list[int]] = {}
    for i in order:
        by_spk.setdefault(m.samples[i].speaker, []).append(i)
    speakers = sorted(by_spk)
    rng.shuffle(speakers)
    # Fill train, then val, then test, a whole speaker at a time, to the target row counts.
    targets = _split_counts(len(order), ratios)
    bounds = [sum(targets[: k + 1]) for k in range(len(targets))]
    groups, taken, k = [[] for _ in ratios], 0, 0
    for spk in speakers:
        while k < len(ratios) - 1 and taken >= bounds[k]:
            k += 1
        groups[k].extend(by_spk[spk])
        taken += len(by_spk[spk])
    return groups, f"{len(by_spk)} speakers"


def split_manifest(manifest: Manifest | str | Path, out_dir: str | Path,
                   ratios: tuple[float, ...] = (80, 10, 10), by: str | None = None,
                   quick: int = 50, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Split a manifest into train/val/test JSONL files (plus a small `quick` subset of train).

    Deterministic for a given seed. Splits with ratio 0 are not written.

    Args:
        manifest: A Manifest or a manifest path.
        out_dir: Folder for train.jsonl, val.jsonl, test.jsonl, quick.jsonl.
        ratios: Relative sizes of train/val(/test), e.g. (80, 10, 10) or (90, 10).
        by: None for a row-level split, or "speaker" so that no speaker is in two splits.
        quick: Rows in quick.jsonl (a random subset of train); 0 to skip it.
        seed: Shuffle seed.
        force: Remove split files of an earlier split in `out_dir` that this one would not rewrite
            (without it, such files are refused: an old test.jsonl next to a new val.jsonl shares rows).

    Returns:
        Split name -> written path.
    """
    m = as_manifest(manifest)
    out_dir = Path(out_dir)
    ratios = [float(r) for r in ratios]
    if not 2 <= len(ratios) <= 3 or any(r < 0 for r in ratios) or ratios[0] <= 0:
        raise ManifestError(f"ratios must be 2 or 3 non-negative numbers with train > 0, got {ratios}; "
                            "e.g. 80/10/10")
    names = SPLIT_NAMES[: len(ratios)]
    rng = random.Random(seed)
    if by is None:
        groups, what = _row_groups(len(m.samples), ratios, rng)
    elif by == "speaker":
        groups, what = _speaker_groups(m, ratios, rng)
    else:
        raise ManifestError(f"unknown split key by={by!r}; use None or 'speaker'")
    empty = [names[k] for k, g in enumerate(groups) if ratios[k] > 0 and not g]
    if empty:
        raise ManifestError(f"{m.path}: {what} are too few for ratios {ratios}: {', '.join(empty)} "
                            "would be empty; add data or change --ratios")
    _clear_old_splits(out_dir, [n for n, r in zip(names, ratios) if r > 0] + (["quick"] if quick > 0 else []), force)
    written = {}
    for name, group, r in zip(names, groups, ratios):
        if r > 0:
            written[name] = write_manifest([m.samples[i] for i in sorted(group)], out_dir / f"{name}.jsonl")
    if quick > 0:
        train = groups[0]
        pick = sorted(train[:quick]) if by is None else sorted(rng.sample(train, min(quick, len(train))))
        written["quick"] = write_manifest([m.samples[i] for i in pick], out_dir / "quick.jsonl")
    return written


def _clear_old_splits(out_dir: Path, writing: list[str], force: bool) -> None:
    stale = [out_dir / f"{n}.jsonl" for n in (*SPLIT_NAMES, "quick") if n not in writing]
    stale = [p for p in stale if p.exists()]
    if stale and not force:
        raise ManifestError(
            f"{out_dir} holds {', '.join(p.name for p in stale)} from an earlier split, which this split would "
            "not replace (its rows may overlap the new splits); use another --out-dir, or --force to remove them")
    for p in stale:
        p.unlink()
