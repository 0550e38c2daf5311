"""Manifests (JSONL/CSV/TSV): loading and validation, writing, statistics and run copies.

A manifest row is {"audio": path, "text": transcript} plus optional "id", "duration" (seconds),
"speaker" and any extra keys, which are kept. Relative audio paths resolve against the manifest's
folder. CSV/TSV need a header row naming at least `audio` and `text`.

Validation reads every row, checks each audio file's header with `soundfile.info` (cheap: nothing
is decoded), and reports every bad row in one `ManifestError`. Splits are in splits.py; the
training row order (length-bucketed batches) in train/batches.py.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import ManifestError
from .io import atomic_write_bytes, atomic_write_text, sha256_file

_KNOWN = ("id", "audio", "text", "duration", "speaker")
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
_MAX_LISTED = 100  # problems listed in one error message; the total is always given


@dataclass
class Sample:
    """One utterance. `duration` is in seconds (None if neither the row nor the audio header gave it)."""

    id: str
    audio_path: Path
    text: str
    duration: float | None = None
    speaker: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Manifest:
    """A loaded, validated manifest.

    Attributes:
        path: The manifest file (absolute).
        samples: Usable rows in file order.
        skipped: (line number, reason) of rows left out with `skip_invalid=True`.
        sha256: Hash of the manifest file, for recording in run metadata.
    """

    path: Path
    samples: list[Sample]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    sha256: str = ""

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.samples)


def _read_text(path: Path) -> str:
    """The manifest as text: UTF-8, with or without a byte-order mark (Excel writes one)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ManifestError(
            f"{path}: line {line} is not UTF-8 (byte 0x{data[e.start]:02x}); manifests must be UTF-8 text: "
            f"re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}-utf8{path.suffix}`)"
        ) from None


def _read_rows(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """Yield (1-based line number, row or None, parse problem or None)."""
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ManifestError(f"{path}: unknown manifest type '{path.suffix}'; use .jsonl, .csv or .tsv")
    with io.StringIO(_read_text(path), newline="") as f:
        if fmt == "jsonl":
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield i, None, f"not valid JSON ({e.msg})"
                    continue
                if isinstance(row, dict):
                    yield i, row, None
                else:
                    yield i, None, f"expected a JSON object, got {type(row).__name__}"
            return
        reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
        header = reader.fieldnames or []
        missing = [k for k in ("audio", "text") if k not in header]
        if missing:
            raise ManifestError(
                f"{path}: header {header} lacks column(s) {missing}; the first row must name the "
                f"columns, including 'audio' and 'text'"
            )
        for row in reader:
            line = reader.line_num
            if None in row:  # more cells than header columns
                yield line, None, f"{len(header) + len(row[None])} cells but the header has {len(header)}"
                continue
            yield line, {k: v for k, v in row.items() if v not in (None, "") or k in ("audio", "text")}, None


def _audio_duration(path: Path) -> float:
    """Seconds, from the file header. Raises whatever soundfile raises."""
    import soundfile as sf

    info = sf.info(str(path))
    return info.frames / info.samplerate


def _check_audio_file(path: Path) -> tuple[float | None, str | None]:
    """(seconds from the header, problem or None): what `audio.load_audio` would refuse, found up front.

    Only the header is read, except for float WAV/FLAC (the only kinds that can hold NaN), whose samples
    are scanned in blocks for NaN/inf.
    """
    import numpy as np
    import soundfile as sf

    from .audio import MIN_SAMPLES, SAMPLE_RATE

    if path.stat().st_size == 0:
        return None, f"audio file is empty (0 bytes): {path}"
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/TypeError by format
        return None, f"audio file unreadable: {path} ({e})"
    if info.samplerate <= 0 or info.frames <= 0:
        return None, f"audio file holds no samples: {path}"
    seconds = info.frames / info.samplerate
    if seconds * SAMPLE_RATE < MIN_SAMPLES:
        return seconds, (f"audio is too short: {path} is {seconds * 1000:.0f} ms, Moonshine's encoder needs "
                         f"at least {MIN_SAMPLES / SAMPLE_RATE * 1000:.0f} ms")
    if info.subtype in ("FLOAT", "DOUBLE"):
        try:
            for block in sf.blocks(str(path), blocksize=1 << 16, dtype="float32"):
                if not np.isfinite(block).all():
                    return seconds, f"audio contains NaN or infinite samples: {path}; re-export the file"
        except Exception as e:
            return seconds, f"audio file unreadable: {path} ({e})"
    return seconds, None


def _row_to_sample(line: int, row: dict, base: Path, check_audio: bool,
                   max_seconds: float | None) -> tuple[Sample | None, list[str]]:
    problems = []
    audio, text = row.get("audio"), row.get("text")
    if audio is not None and not isinstance(audio, str):
        problems.append(f"'audio' must be a path string, got {type(audio).__name__} {audio!r:.40}")
    elif not audio or not audio.strip():
        problems.append("missing 'audio' path")
    if text is None:
        problems.append("missing 'text'")
    elif not isinstance(text, str):
        problems.append(f"'text' must be a string, got {type(text).__name__} {text!r:.40}; quote it in the manifest")
    elif not text.strip():
        problems.append("'text' is empty (must be a non-empty string)")
    duration = row.get("duration")
    if duration is not None:
        try:
            duration = float(duration)
            if not math.isfinite(duration) or duration <= 0:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"'duration' must be a positive number of seconds, got {row['duration']!r}")
            duration = None
    if problems:
        return None, problems
    audio_path = Path(audio)
    audio_path = (audio_path if audio_path.is_absolute() else base / audio_path).resolve()
    if check_audio:
        if not audio_path.is_file():
            return None, [f"audio file not found: {audio_path}"]
        file_duration, problem = _check_audio_file(audio_path)
        if problem:
            return None, [problem]
        duration = duration if duration is not None else file_duration
    if max_seconds is not None and duration is not None and duration > max_seconds:
        return None, [f"audio is {duration:.1f} s, longer than max_seconds={max_seconds:g}"]
    extra = {k: v for k, v in row.items() if k not in _KNOWN}
    speaker = row.get("speaker")
    sample = Sample(id=str(row.get("id") or audio_path.stem), audio_path=audio_path, text=text,
                    duration=duration, speaker=None if speaker is None else str(speaker), extra=extra)
    return sample, []


def load_manifest(path: str | Path, *, check_audio: bool = True, max_seconds: float | None = None,
                  skip_invalid: bool = False) -> Manifest:
    """Load and validate a JSONL/CSV/TSV manifest.

    Args:
        path: The manifest file.
        check_audio: Check each audio file exists and has a readable header (not decoded).
        max_seconds: Rows longer than this are bad (duration from the row, else the header).
        skip_invalid: Leave bad rows out (recorded in `Manifest.skipped`) instead of raising.

    Returns:
        The Manifest.

    Raises:
        ManifestError: a missing/empty manifest, or bad rows (all of them listed, with line
            numbers) when `skip_invalid` is False.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found; check the path")
    base = path.parent
    samples, bad, first_line_of_id, n_rows = [], [], {}, 0
    for line, row, problem in _read_rows(path):
        n_rows += 1
        if problem:
            bad.append((line, problem))
            continue
        sample, problems = _row_to_sample(line, row, base, check_audio, max_seconds)
        if sample is not None and sample.id in first_line_of_id:
            problems = [f"duplicate id '{sample.id}' (first on line {first_line_of_id[sample.id]}); "
                        "give each row a unique 'id'"]
        if problems:
            bad.append((line, "; ".join(problems)))
            continue
        first_line_of_id[sample.id] = line
        samples.append(sample)
    if n_rows == 0:
        raise ManifestError(f"{path}: manifest has no rows; add one row per utterance")
    if bad and not skip_invalid:
        listed = "\n".join(f"  line {line}: {why}" for line, why in bad[:_MAX_LISTED])
        more = f"\n  ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise ManifestError(
            f"{path}: {len(bad)} of {n_rows} rows are bad:\n{listed}{more}\n"
            "Fix these rows, or skip them (skip_invalid=True / --skip-invalid)."
        )
    if not samples:
        raise ManifestError(f"{path}: none of its {n_rows} rows is usable; first problem: "
                            f"line {bad[0][0]}: {bad[0][1]}")
    return Manifest(path=path, samples=samples, skipped=bad, sha256=sha256_file(path))


def as_manifest(manifest: Manifest | str | Path) -> Manifest:
    """`manifest` itself, or the manifest at that path loaded with the default checks."""
    return manifest if isinstance(manifest, Manifest) else load_manifest(manifest)


def _sample_row(s: Sample, out_dir: Path) -> dict:
    try:
        audio = os.path.relpath(s.audio_path, out_dir)
    except ValueError:  # another drive on Windows
        audio = str(s.audio_path)
    row = {"id": s.id, "audio": audio, "text": s.text}
    if s.duration is not None:
        row["duration"] = round(s.duration, 4)
    if s.speaker is not None:
        row["speaker"] = s.speaker
    row.update(s.extra)
    return row


def write_manifest(samples: list[Sample], path: str | Path) -> Path:
    """Write samples as JSONL (atomically); audio paths relative to the file's folder."""
    path = Path(path).resolve()
    text = "".join(json.dumps(_sample_row(s, path.parent), ensure_ascii=False) + "\n" for s in samples)
    atomic_write_text(path, text)
    return path


def sample_duration(s: Sample) -> float:
    """Seconds, from the row or else the audio header."""
    if s.duration is None:
        s.duration = _audio_duration(s.audio_path)
    return s.duration


def manifest_stats(manifest: Manifest | str | Path) -> dict:
    """Row count, hours, speaker count and duration min/median/mean/max (seconds)."""
    m = as_manifest(manifest)
    d = [sample_duration(s) for s in m.samples]
    speakers = {s.speaker for s in m.samples if s.speaker is not None}
    return dict(
        path=str(m.path), n=len(d), hours=sum(d) / 3600, speakers=len(speakers),
        duration_min=min(d), duration_median=statistics.median(d), duration_mean=statistics.fmean(d),
        duration_max=max(d), skipped=m.n_skipped, sha256=m.sha256,
    )


def copy_manifest(manifest_path: str | Path, run_dir: str | Path) -> dict:
    """Copy a manifest file byte for byte into `run_dir/manifests/` so a run records its data.

    The copy is a record: its relative audio paths are not rewritten. A different file with the
    same name gets the first 8 hex digits of its hash appended.

    Returns:
        dict(path=copied file, sha256=its hash, source=original path).
    """
    src = Path(manifest_path).resolve()
    if not src.is_file():
        raise ManifestError(f"{src}: manifest not found; check the path")
    data = src.read_bytes()
    digest = sha256_file(src)
    dest = Path(run_dir) / "manifests" / src.name
    if dest.exists() and sha256_file(dest) != digest:
        dest = dest.with_name(f"{src.stem}-{digest[:8]}{src.suffix}")
    atomic_write_bytes(dest, data)
    shutil.copystat(src, dest)
    return dict(path=str(dest), sha256=digest, source=str(src))
