"""High-level transcription: audio files or arrays in, text out, with the shared audio pipeline and decoder."""

from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import numpy as np

from .audio import SAMPLE_RATE, AudioWarning, prepare_audio, split_on_silence
from .decoding import DecodingOptions, decode_batch

# Moonshine was trained on utterances up to ~30 s; longer audio is cut at quiet points into pieces of
# at most this many seconds (upstream tools use 20 s pieces for two_cities.wav).
MAX_CHUNK_SECONDS = 20.0

AudioInput = Union[str, "os.PathLike", np.ndarray]  # noqa: F821


def transcribe(model, processor, audio, options: Optional[DecodingOptions] = None, batch_size: int = 8,
               max_chunk_seconds: float = MAX_CHUNK_SECONDS):
    """Transcribe one clip (returns str) or a list of clips (returns list[str]).

    Args:
        model, processor: from `mlx_moonshine.load`.
        audio: a path, a 16 kHz float array, or a list of them.
        options: decoding options (default: greedy with the Moonshine token budget).
        batch_size: pieces decoded together.
        max_chunk_seconds: longer clips are split at quiet points into pieces of at most this length.
    """
    single = not isinstance(audio, (list, tuple))
    clips = [audio] if single else list(audio)
    results = transcribe_clips(model, processor, clips, options, batch_size, max_chunk_seconds)
    texts = [r["text"] for r in results]
    return texts[0] if single else texts


def transcribe_clips(model, processor, clips: Sequence, options: Optional[DecodingOptions] = None,
                     batch_size: int = 8, max_chunk_seconds: float = MAX_CHUNK_SECONDS) -> list[dict]:
    """Like `transcribe`, returning per clip {"text", "pieces", "seconds", "truncated"} (+ "warnings", if any).

    Every clip is read before any is decoded, so a bad file fails fast.
    """
    options = options or DecodingOptions()
    arrays, notes = [], []
    for c in clips:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AudioWarning)
            arrays.append(prepare_audio(c, processor.audio))
        notes.append([str(w.message) for w in caught if issubclass(w.category, AudioWarning)])
        for w in caught:
            if not issubclass(w.category, AudioWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    # Cut every clip into pieces; decode all pieces in length-sorted batches (less padding).
    pieces = []  # (clip index, samples)
    for i, x in enumerate(arrays):
        for start, end in split_on_silence(x, max_seconds=max_chunk_seconds, sample_rate=SAMPLE_RATE):
            pieces.append((i, x[start:end]))
    order = sorted(range(len(pieces)), key=lambda j: len(pieces[j][1]))
    decoded = [None] * len(pieces)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        for j, res in zip(idx, decode_batch(model, processor, [pieces[j][1] for j in idx], options)):
            decoded[j] = res
    out = [{"text": "", "pieces": 0, "seconds": len(x) / SAMPLE_RATE, "truncated": False} for x in arrays]
    for (i, _), res in zip(pieces, decoded):
        o = out[i]
        o["text"] = f"{o['text']} {res.text}".strip() if res.text else o["text"]
        o["pieces"] += 1
        o["truncated"] = o["truncated"] or res.truncated
    for o, note in zip(out, notes):
        if note:
            o["warnings"] = note
    return out
