"""Validation during training: the val loss and the val WER of the same rows from one encoder pass.

A validation used to cost about as much as the 50 training steps before it: the val loss at the training
batch (2) in manifest order, then the val WER rows encoded again for decoding. Here rows go in order of
duration (little padding) at `EVAL_BATCH`, each batch is encoded once, and that memory serves both the
teacher-forced loss and the greedy/beam decode of the WER rows. What is measured does not change: the loss
is the token-weighted mean over the same rows, the WER is over the same first rows, decoded by the shared
decoder with the same budgets (the prepared clip lengths).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import mlx.core as mx
import numpy as np

from ..audio import pad_batch
from ..distributed import world as _world
from .batches import EncoderCache, iterate_batches, load_clips, make_batch, tokenize
from .step import default_loss

if TYPE_CHECKING:
    from .config import TrainArgs

EVAL_BATCH = 8  # rows per validation batch (no gradients: memory is a few hundred MB at 8 x 12 s)


def _duration(s) -> float:
    return s.duration if s.duration is not None else 0.0


def validation_pass(model, processor, samples, loss: Callable, *, loss_rows: Optional[int] = None,
                    wer_rows: int = 0, options=None, cache: Optional[EncoderCache] = None, max_len=None,
                    batch_size: int = EVAL_BATCH) -> dict:
    """Loss over the first `loss_rows` of `samples` (None: all) and transcripts of the first `wer_rows`.

    Returns:
        {"loss": token-weighted mean loss (nan without loss rows), "tokens": label tokens,
         "wer": corpus scores of the WER rows as `eval_wer` gives them (absent when wer_rows is 0)}.
    """
    from ..decoding import DecodingOptions
    from ..metrics import corpus_scores

    options = options or DecodingOptions()
    loss_ids = {s.id for s in (samples if loss_rows is None else samples[:loss_rows])}
    wer_ids = {s.id for s in samples[:wer_rows]}
    rows = [s for s in dict((s.id, s) for s in samples).values() if s.id in loss_ids or s.id in wer_ids]
    rows.sort(key=_duration)

    def one(chunk) -> tuple[float, int, list[dict]]:
        """(loss x tokens, tokens, scored WER rows) of one batch: JSON-able, gathered between processes."""
        memory, valid, lengths = _encode(model, processor, chunk, cache)
        in_loss = [i for i, s in enumerate(chunk) if s.id in loss_ids]
        total, count = _batch_loss(model, processor, chunk, in_loss, memory, valid, loss, max_len)
        in_wer = [i for i, s in enumerate(chunk) if s.id in wer_ids]
        scored = _batch_wer(model, processor, chunk, in_wer, memory, valid, lengths, options, batch_size)
        return total, count, scored

    chunks = [rows[b:b + batch_size] for b in range(0, len(rows), batch_size)]
    total, count, scored = 0.0, 0, []
    for t, c, sc in _world().map_all(chunks, one):  # batches shared out between processes, gathered
        total += t
        count += c
        scored += sc
    out = {"loss": total / count if count else float("nan"), "tokens": count}
    if wer_rows:
        wer = corpus_scores(scored)
        wer["samples"] = sorted(scored, key=lambda r: r["id"])
        out["wer"] = wer
    return out


def _encode(model, processor, chunk, cache: Optional[EncoderCache]):
    """(memory, valid, prepared clip lengths) of one validation batch: from the cache, or one encoder pass."""
    if cache is not None:
        memory, valid = cache.batch(chunk)
        lengths = np.array([cache.samples[s.id] for s in chunk])
    else:
        x, lengths = pad_batch(load_clips(chunk, processor))  # rows of similar length: little padding
        padded = bool((lengths != x.shape[1]).any())
        memory, valid = model.encode(mx.array(x), mx.array(lengths) if padded else None)
    mx.eval(memory)
    return memory, valid, lengths


def _batch_loss(model, processor, chunk, rows: list[int], memory, valid, loss: Callable, max_len):
    """(loss x tokens, tokens) of the batch rows `rows`, teacher-forced on the batch's encoder memory."""
    if not rows:
        return 0.0, 0
    idx = mx.array(rows) if len(rows) < len(chunk) else None
    tokens, labels = tokenize(processor, [chunk[i].text for i in rows], max_len)
    batch = {"tokens": mx.array(tokens), "labels": mx.array(labels),
             "memory": memory if idx is None else memory[idx],
             "valid": valid if idx is None or valid is None else valid[idx]}
    value, ntoks = loss(model, batch)
    mx.eval(value, ntoks)
    return value.item() * ntoks.item(), int(ntoks.item())


def _batch_wer(model, processor, chunk, rows: list[int], memory, valid, lengths, options, batch_size: int):
    """Scored transcripts of the batch rows `rows`, decoded from the batch's encoder memory; a clip longer
    than eval's split limit is decoded as eval decodes it: in pieces, by transcribe_clips."""
    from ..audio import SAMPLE_RATE
    from ..decoding import decode_memory
    from ..metrics import score
    from ..transcription import MAX_CHUNK_SECONDS, transcribe_clips

    longest = int(MAX_CHUNK_SECONDS * SAMPLE_RATE)
    split = [i for i in rows if int(lengths[i]) > longest]
    whole = [i for i in rows if int(lengths[i]) <= longest]
    scored = []
    if whole:
        idx = mx.array(whole)
        results = decode_memory(model, processor, memory[idx], None if valid is None else valid[idx],
                                np.asarray(lengths)[whole], options)
        scored += [dict(score(chunk[i].text, r.text), id=chunk[i].id) for i, r in zip(whole, results)]
    if split:
        results = transcribe_clips(model, processor, [chunk[i].audio_path for i in split], options, batch_size)
        scored += [dict(score(chunk[i].text, r["text"]), id=chunk[i].id) for i, r in zip(split, results)]
    return scored


# -- the same figures one pass at a time (reference for validation_pass; benchmarks) ----------------


def eval_loss(model, processor, samples, args: TrainArgs, loss: Callable = default_loss,
              cache: Optional[EncoderCache] = None, max_batches: int = 0, max_len=None) -> float:
    """Token-weighted mean loss over `samples` (fixed order; the first `max_batches` batches if > 0).

    Under a launcher the batches are shared out between the processes and their values gathered: the
    same batches, the same sum in the same order as in one process.
    """
    batches = list(iterate_batches(samples, args.batch_size, shuffle=False))
    if max_batches:
        batches = batches[:max_batches]

    def one(b):
        value, ntoks = loss(model, make_batch(b, processor, args, cache=cache, max_len=max_len, buckets=False))
        mx.eval(value, ntoks)
        return value.item(), ntoks.item()

    total, count = 0.0, 0
    for value, ntoks in _world().map_all(batches, one):
        total += value * ntoks
        count += ntoks
    return total / max(count, 1)


def eval_wer(model, processor, samples, options, batch_size: int = 8) -> dict:
    """Corpus WER/CER of the transcripts `eval` would write for `samples`: the same `transcribe_clips`
    (audio pipeline, <= 20 s splitting, length-sorted batches) and the same decoding options."""
    from ..eval.evaluate import _sample_length
    from ..metrics import corpus_scores, score
    from ..transcription import transcribe_clips

    order = sorted(samples, key=_sample_length)  # the batches `eval` decodes: length-sorted groups

    def one(chunk):
        results = transcribe_clips(model, processor, [s.audio_path for s in chunk], options, batch_size)
        return [dict(score(s.text, res["text"]), id=s.id) for s, res in zip(chunk, results)]

    chunks = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    rows = [r for part in _world().map_all(chunks, one) for r in part]  # decode batches shared out, gathered
    out = corpus_scores(rows)
    out["samples"] = sorted(rows, key=lambda r: r["id"])
    return out
