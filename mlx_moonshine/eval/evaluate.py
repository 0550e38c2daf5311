"""Evaluate a model (plus optional adapter) on manifests; write a resumable, self-describing run folder.

A run folder (RUN) holds:
    run.json           what was evaluated and how: decode options, audio normalisation, text normaliser,
                       model and adapter paths with the sha256 of their weights, manifests with their sha256
    predictions.jsonl  one row per utterance (manifest name, id, ref, hyp, normalised texts, errors, seconds),
                       appended and flushed batch by batch, so an interrupted eval resumes where it stopped
    summary.json       {"run": run.json, "manifests": {name: corpus WER/CER, hours, speed, ...}}
    manifests/         byte-for-byte copies of the manifests evaluated

Resuming requires the same model, adapter, options and normalisation as recorded in run.json; otherwise
the run is refused (use a new RUN or `force=True`, which starts over), so no file ever mixes two setups.

Under `mlx.launch` the decode batches (the same batches as in one process) are shared out between the
processes and their rows gathered in batch order; only rank 0 writes RUN (distributed.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..adapters.apply import WEIGHTS_FILE
from ..data import Sample, copy_manifest, load_manifest
from ..decoding import DecodingOptions
from ..distributed import world as _world
from ..errors import AudioError, MoonshineError
from ..io import atomic_write_json, atomic_write_text, run_lock, sha256_file, writing
from ..metrics import TextNormalizer, corpus_scores, score

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "predictions.jsonl"
MODEL_WEIGHTS = "model.safetensors"

# run.json keys that must match for rows of two sessions to share one predictions.jsonl.
_FINGERPRINT = ("decoding", "audio_normalization", "text_normalizer", "model", "adapter")


class EvalError(MoonshineError):
    """A run folder that cannot be used as asked (mismatched resume, missing files)."""


def manifest_name(path: str | Path) -> str:
    """The key of a manifest in run files: its file name without the extension."""
    return Path(path).stem


def _weights_record(path: Optional[str | Path], weights_file: str) -> Optional[dict]:
    if path is None:
        return None
    path = Path(path)
    f = path / weights_file
    return {"path": str(path.resolve()) if path.exists() else str(path),
            "sha256": sha256_file(f) if f.is_file() else None}


def _version() -> str:
    from .. import __version__

    return __version__


def _read_predictions(path: Path) -> list[dict]:
    """Rows of predictions.jsonl; a torn last line (killed mid-write) is dropped and the file repaired."""
    if not path.is_file():
        return []
    # Cut at "\n" only: rows are written with ensure_ascii=False, and str.splitlines would also cut a
    # transcript at a U+2028 or U+0085 inside it. A complete file ends in "\n": its last piece is "".
    rows, lines = [], path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise EvalError(f"{path}: line {i + 1} is not valid JSON ({e.msg}); delete that line, or start "
                            "over with a new output folder or --force") from e
    if lines[-1] or len(rows) != sum(1 for x in lines if x.strip()):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def _identity(value):
    """What must match on resume: weights by hash (the folder may move), everything else as is."""
    if isinstance(value, dict) and value.get("sha256"):
        return value["sha256"]
    return value


def _check_resume(out_dir: Path, run: dict, force: bool) -> Optional[dict]:
    """The previous run.json if resuming is allowed; None when starting fresh. Raises on a mismatch."""
    old_path = out_dir / RUN_FILE
    if not old_path.is_file():
        return None
    try:
        old = json.loads(old_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if force:
            return None
        raise EvalError(f"{old_path}: not valid JSON ({e}); use a new output folder or --force") from e
    diffs = [k for k in _FINGERPRINT if _identity(old.get(k)) != _identity(run.get(k))]
    for name, m in run["manifests"].items():
        prev = old.get("manifests", {}).get(name)
        if prev and prev.get("sha256") != m["sha256"]:
            diffs.append(f"manifest '{name}' content (sha256 {prev.get('sha256', '?')[:12]} -> {m['sha256'][:12]})")
    if not diffs:
        return old
    if force:
        return None
    raise EvalError(
        f"{out_dir} holds an evaluation made with a different {', '.join(diffs)}; its predictions cannot be "
        "resumed with these settings. Use a new output folder (-o), or --force to discard it and start over"
    )


def _score_row(name: str, s: Sample, hyp: str, seconds: float, truncated: bool, decode_s: float,
               normalizer: TextNormalizer) -> dict:
    sc = score(s.text, hyp, normalizer)
    return dict(manifest=name, id=s.id, audio=str(s.audio_path), ref=s.text, hyp=hyp,
                ref_norm=sc["ref"], hyp_norm=sc["hyp"], wer=sc["wer"], cer=sc["cer"],
                substitutions=sc["substitutions"], deletions=sc["deletions"], insertions=sc["insertions"],
                hits=sc["hits"], ref_words=sc["ref_words"], char_errors=sc["char_errors"],
                ref_chars=sc["ref_chars"], seconds=round(seconds, 4), truncated=truncated,
                decode_s=round(decode_s, 4))


def _decode_group(model, processor, samples: list[Sample], options: DecodingOptions, batch_size: int,
                  skip_invalid: bool, name: str) -> tuple[list[tuple[Sample, dict]], list[tuple[str, str]]]:
    """Decode samples together; with skip_invalid, clips whose audio fails are set aside one by one."""
    from ..transcription import transcribe_clips

    try:
        results = transcribe_clips(model, processor, [s.audio_path for s in samples], options, batch_size)
        return list(zip(samples, results)), []
    except AudioError as e:
        if not skip_invalid:
            ids = ", ".join(s.id for s in samples)
            raise AudioError(f"{e} (manifest '{name}', one of ids {ids}); fix or remove the row, "
                             "or pass --skip-invalid") from e
        if len(samples) == 1:
            return [], [(samples[0].id, str(e))]
    done, bad = [], []
    for s in samples:
        d, b = _decode_group(model, processor, [s], options, batch_size, skip_invalid, name)
        done += d
        bad += b
    return done, bad


def _decode_rows(model, processor, group: list[Sample], options: DecodingOptions, batch_size: int,
                 skip_invalid: bool, name: str, normalizer: TextNormalizer) -> tuple[list[dict], list[list]]:
    """Prediction rows of one decode batch and [id, reason] of its clips set aside (JSON-able: gathered)."""
    t0 = time.perf_counter()
    decoded, bad = _decode_group(model, processor, group, options, batch_size, skip_invalid, name)
    per_clip = (time.perf_counter() - t0) / max(len(decoded), 1)
    rows = []
    for s, res in decoded:
        row = _score_row(name, s, res["text"], res["seconds"], res["truncated"], per_clip, normalizer)
        if res.get("warnings"):
            row["warnings"] = res["warnings"]
        rows.append(row)
    return rows, [list(b) for b in bad]


def _manifest_summary(rows: list[dict], record: dict, n_skipped: int) -> dict:
    c = corpus_scores(rows) if rows else dict(n=0, wer=0.0, cer=0.0, word_errors=0, ref_words=0)
    audio_s = sum(r["seconds"] for r in rows)
    decode_s = sum(r.get("decode_s", 0.0) for r in rows)
    return dict(
        n=len(rows), n_skipped=n_skipped, wer=c["wer"], cer=c["cer"], word_errors=c["word_errors"],
        ref_words=c["ref_words"], n_truncated=sum(bool(r["truncated"]) for r in rows),
        n_with_errors=sum(r["substitutions"] + r["deletions"] + r["insertions"] > 0 for r in rows),
        audio_seconds=round(audio_s, 3), hours=audio_s / 3600, decode_seconds=round(decode_s, 3),
        rtf=decode_s / audio_s if audio_s else None,  # decode time per second of audio (< 1: faster than real time)
        manifest=record,
    )


def evaluate(model, processor, manifests: Sequence[str | Path], out_dir: str | Path, *,
             options: DecodingOptions = DecodingOptions(), batch_size: int = 8,
             normalizer: TextNormalizer = TextNormalizer(), skip_invalid: bool = False,
             model_path: Optional[str | Path] = None, adapter_path: Optional[str | Path] = None,
             progress: bool = True, limit: Optional[int] = None, force: bool = False) -> dict:
    """Transcribe every row of each manifest, score it, and write a run folder (see module docstring).

    Args:
        model, processor: from `mlx_moonshine.load` (with the adapter already applied, if any).
        manifests: JSONL/CSV/TSV manifests; each is keyed by its file name without extension.
        out_dir: The run folder. If it already holds predictions made the same way, they are kept and
            only the missing rows are decoded.
        options: Decoding options (recorded; a resume must use the same).
        batch_size: Clips decoded together; clips are sorted by length first to minimise padding.
        normalizer: Text normalisation applied to reference and hypothesis before scoring.
        skip_invalid: Leave out bad manifest rows and unreadable audio (counted in `n_skipped`)
            instead of stopping.
        model_path: The model folder (default `processor.path`); its weights are hashed into run.json.
        adapter_path: The adapter folder applied to `model`, if any; hashed into run.json.
        progress: Show a progress bar per manifest on stderr.
        limit: Evaluate only the first `limit` usable rows of each manifest.
        force: Discard an existing run made with other settings instead of refusing.

    Returns:
        The summary dict (also written to `out_dir/summary.json`).

    Raises:
        ManifestError: bad rows (all listed) unless `skip_invalid`; EvalError: a mismatched resume.
    """
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1 (got {batch_size})")
    loaded = _load_manifests(manifests, skip_invalid)  # validate everything before decoding anything
    run = dict(
        decoding=options.to_dict(), audio_normalization=processor.audio.to_dict(),
        text_normalizer=normalizer.to_dict(),
        model=_weights_record(model_path if model_path is not None else processor.path, MODEL_WEIGHTS),
        adapter=_weights_record(adapter_path, WEIGHTS_FILE),
        manifests={name: dict(source=str(m.path), sha256=m.sha256) for name, m in loaded.items()},
        mlx_moonshine_version=_version(),
    )
    world = _world()
    out_dir = world.local_folder(Path(out_dir), (RUN_FILE, PREDICTIONS_FILE, SUMMARY_FILE))  # others: a copy
    decode = _ManifestDecoder(model, processor, options, batch_size, skip_invalid, normalizer, limit,
                              progress and world.is_main)
    with run_lock(out_dir, "eval"):  # a second eval into this folder would write every id twice
        old = _start_run(out_dir, run, loaded, force)
        pred_path = out_dir / PREDICTIONS_FILE
        rows = _read_predictions(pred_path)
        previous = _previous_summaries(out_dir) if old is not None else {}
        with writing(pred_path):
            # Unbuffered: a batch's rows go out in one write, and a failed write leaves nothing for close()
            # to retry (a close() error would replace the message that names this file).
            pred_file = open(pred_path, "ab", buffering=0)
        with pred_file:
            summaries = {name: decode(name, m, rows, previous.get(name, {}), pred_file, pred_path,
                                      run["manifests"][name]) for name, m in loaded.items()}
        # Manifests evaluated into this folder by an earlier call (same settings) stay in the summary.
        summaries = {**{k: v for k, v in previous.items() if k not in summaries}, **summaries}
        summary = dict(run={**run, "updated": _now()}, manifests=summaries)
        atomic_write_json(out_dir / SUMMARY_FILE, summary)
    return summary


def _load_manifests(manifests, skip_invalid: bool) -> dict:
    """name -> loaded `Manifest`, every one validated; two manifests may not share a name."""
    loaded = {}
    for path in manifests:
        name = manifest_name(path)
        if name in loaded:
            raise EvalError(f"two manifests are both named '{name}' ({loaded[name].path} and {Path(path).resolve()}); "
                            "manifests are keyed by file name, so rename one")
        loaded[name] = load_manifest(path, skip_invalid=skip_invalid)
    return loaded


def _start_run(out_dir: Path, run: dict, loaded: dict, force: bool) -> Optional[dict]:
    """Check a resume, copy the manifests in and write run.json; the earlier run.json (None: a new run)."""
    old = _check_resume(out_dir, run, force)
    out_dir.mkdir(parents=True, exist_ok=True)
    if old is None:
        (out_dir / PREDICTIONS_FILE).unlink(missing_ok=True)
        run["created"] = _now()
    else:
        run["created"] = old.get("created", _now())
        run["manifests"] = {**old.get("manifests", {}), **run["manifests"]}
    for name, m in loaded.items():
        run["manifests"][name] = {**run["manifests"][name], **_copy_record(m.path, out_dir)}
    atomic_write_json(out_dir / RUN_FILE, run)
    return old


@dataclass
class _ManifestDecoder:
    """Decodes one manifest's missing rows into predictions.jsonl and returns its summary."""

    model: object
    processor: object
    options: DecodingOptions
    batch_size: int
    skip_invalid: bool
    normalizer: TextNormalizer
    limit: Optional[int]
    progress: bool

    def __call__(self, name: str, m, rows: list[dict], previous: dict, pred_file, pred_path: Path,
                 record: dict) -> dict:
        from tqdm import tqdm

        samples = m.samples[: self.limit] if self.limit is not None else m.samples
        done = {r["id"]: r for r in rows if r.get("manifest") == name}
        todo = sorted((s for s in samples if s.id not in done), key=_sample_length)
        # Clips whose audio failed before stay skipped on resume (with skip_invalid), else are retried.
        failed = [tuple(f) for f in previous.get("failed_audio", [])] if self.skip_invalid else []
        todo = [s for s in todo if s.id not in {i for i, _ in failed}]
        warned: list = []  # [id, warning] of the clips decoded in this call
        bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=name, unit="clip",
                   file=sys.stderr, disable=not self.progress, dynamic_ncols=True)

        def decode(group):
            return _decode_rows(self.model, self.processor, group, self.options, self.batch_size,
                                self.skip_invalid, name, self.normalizer)

        groups = [todo[b:b + self.batch_size] for b in range(0, len(todo), self.batch_size)]
        try:
            for results in _world().map_groups(groups, decode):  # one group a round in one process
                for decoded, bad in results:
                    failed += [tuple(b) for b in bad]
                    for row in decoded:
                        done[row["id"]] = row
                        for w in row.get("warnings", []):
                            bar.write(f"warning: {w}", file=sys.stderr)
                            warned.append([row["id"], w])
                    with writing(pred_path):
                        _write_all(pred_file, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                      for r in decoded).encode("utf-8"))
                    bar.update(len(decoded) + len(bad))
        finally:
            bar.close()
        kept = [done[s.id] for s in samples if s.id in done]
        summary = _manifest_summary(kept, record, m.n_skipped + len(failed))
        extras = dict(failed_audio=failed, audio_warnings=warned,
                      invalid_rows=[dict(line=line, reason=why) for line, why in m.skipped], limit=self.limit)
        summary.update({k: v for k, v in extras.items() if v})
        return summary


def _write_all(f, data: bytes) -> None:
    while data:  # a raw write may take only part of the data (e.g. at a file-size limit); the next one raises
        data = data[f.write(data):]


def _previous_summaries(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / SUMMARY_FILE).read_text(encoding="utf-8")).get("manifests", {})
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}


def _copy_record(manifest_path: Path, out_dir: Path) -> dict:
    c = copy_manifest(manifest_path, out_dir)
    # Stored relative to the run folder, so a moved or copied run folder stays self-contained.
    return dict(copy=os.path.relpath(c["path"], out_dir), sha256=c["sha256"])


def _sample_length(s: Sample) -> float:
    from ..data import sample_duration

    try:
        return sample_duration(s)
    except Exception:  # an unreadable header: sort first; decoding reports the real error
        return 0.0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def format_summary(summary: dict) -> str:
    """A short table: one line per manifest."""
    lines = [f"{'manifest':24s} {'n':>5s} {'skip':>4s} {'WER':>7s} {'CER':>7s} {'hours':>6s} {'RTF':>6s}"]
    for name, s in summary["manifests"].items():
        rtf = f"{s['rtf']:.3f}" if s.get("rtf") is not None else "-"
        lines.append(f"{name:24s} {s['n']:5d} {s['n_skipped']:4d} {100 * s['wer']:6.2f}% {100 * s['cer']:6.2f}% "
                     f"{s['hours']:6.3f} {rtf:>6s}")
    return "\n".join(lines)
