"""The base model's replay targets and teacher table, kept between runs.

Every run with replay starts by asking the frozen base for its transcripts of the replay clips and its
top-k distributions on them (teacher.py): on a CPU ~65 s for the bundled 270 clips with base, the same
answer every time. This store keeps them per base model, so the second run on the same base starts
training at once:

    $MLX_MOONSHINE_CACHE/teacher/<model fingerprint>/   (default ~/.cache/mlx-moonshine/teacher/...)
        targets.jsonl            {"clip", "decoding", "text"} per transcribed clip
        table/<row key>.npz      ids (L, k) int32, probs (L, k) float32 per replay row

The fingerprint hashes the base's weights (every parameter's name, dtype, shape and bytes), its tokenizer
file, audio settings and generation ids; a clip is known by the SHA-256 of its audio file's bytes, a table
row by (clip, target text, k, max_len). Anything else is a miss and is computed as before, so the cache can
only save time, never change a target. `MLX_MOONSHINE_TEACHER_CACHE=off` turns it off; a folder path puts it
there. Under a launcher only process 0 reads and writes it and hands the hits to the others.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..io import atomic_write_bytes, read_jsonl, sha256_file

ENV = "MLX_MOONSHINE_TEACHER_CACHE"


def store_root() -> Optional[Path]:
    """Where the store lives, or None when it is turned off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "none", "false"):
        return None
    if value:
        return Path(value).expanduser()
    from ..convert.wheels import cache_root

    return cache_root() / "teacher"


def model_fingerprint(model, processor) -> str:
    """SHA-256 over the model's parameters and the processor's tokenizer, audio settings and ids."""
    digest = hashlib.sha256()
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}\n".encode())
        raw = value.view(mx.uint8) if value.dtype == mx.bfloat16 else value
        digest.update(np.ascontiguousarray(np.array(raw, copy=False)).tobytes())
    tokenizer = Path(processor.path) / "tokenizer.json"
    digest.update((sha256_file(tokenizer) if tokenizer.is_file() else "no-tokenizer-file").encode())
    digest.update(json.dumps([asdict(processor.audio), processor.generation], sort_keys=True, default=str).encode())
    return digest.hexdigest()


class TeacherStore:
    """The cached answers of one base model (see the module docstring)."""

    def __init__(self, root: Path, fingerprint: str):
        self.folder = Path(root) / fingerprint[:32]
        self._clips: dict[tuple, str] = {}

    def clip(self, path: Path) -> str:
        """SHA-256 of an audio file's bytes (remembered per path, size and mtime in this process)."""
        st = Path(path).stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._clips:
            self._clips[key] = sha256_file(Path(path))
        return self._clips[key]

    # -- transcripts --------------------------------------------------------------------------------

    def targets(self, samples, decoding: dict) -> dict[str, str]:
        """{sample id: the base's transcript} for the samples the store knows under `decoding`."""
        path = self.folder / "targets.jsonl"
        if not path.is_file():
            return {}
        known = {}
        for row in read_jsonl(path):  # without the torn line of a run killed while appending
            if row.get("decoding") == decoding:
                known[row["clip"]] = row["text"]
        out = {}
        for s in samples:
            text = known.get(self.clip(s.audio_path))
            if text is not None:
                out[s.id] = text
        return out

    def add_targets(self, samples, texts: dict[str, str], decoding: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(dict(clip=self.clip(s.audio_path), decoding=decoding, text=texts[s.id])) + "\n"
                 for s in samples if s.id in texts]
        with open(self.folder / "targets.jsonl", "a", encoding="utf-8") as f:  # whole lines; a torn one is skipped
            f.writelines(lines)

    # -- teacher table ------------------------------------------------------------------------------

    def _row_path(self, sample, k: int, max_len) -> Path:
        key = json.dumps([self.clip(sample.audio_path), sample.text, k, max_len])
        return self.folder / "table" / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.npz"

    def table_rows(self, samples, k: int, max_len) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{sample id: (ids, probs)} for the rows the store holds."""
        out = {}
        for s in samples:
            path = self._row_path(s, k, max_len)
            if path.is_file():
                try:
                    with np.load(path) as z:
                        out[s.id] = (z["ids"].astype(np.int32), z["probs"].astype(np.float32))
                except (OSError, ValueError, KeyError):
                    continue  # unreadable: computed again (and rewritten)
        return out

    def add_table_rows(self, samples, table, k: int, max_len) -> None:
        for s in samples:
            if s.id not in table.ids:
                continue
            buf = io.BytesIO()
            np.savez(buf, ids=table.ids[s.id], probs=table.probs[s.id])
            path = self._row_path(s, k, max_len)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buf.getvalue())


def open_store(model, processor) -> Optional[TeacherStore]:
    """The store for this base model, or None when turned off (or its folder cannot be made)."""
    root = store_root()
    if root is None:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: the run computes everything, as without the store
    return TeacherStore(root, model_fingerprint(model, processor))


__all__ = ["ENV", "TeacherStore", "model_fingerprint", "open_store", "store_root"]
