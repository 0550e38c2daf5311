"""Validation during training: the val loss and the val WER of the same rows from one encoder pass.

A validation used to cost about as much as the 50 training steps before it: the val loss at the training
batch (2) in manifest order, then the val WER rows encoded again for decoding. Here rows go in order of
duration (little padding) at `EVAL_BATCH`, each batch is encoded once, and that memory serves both the
teacher-forced loss and the greedy/beam decode of the WER rows. What is measured does not change: the loss
is the token-weighted mean over the same rows, the WER is over the same first rows, decoded by the shared
decoder with the same budgets (the prepared clip lengths).
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from .audio import pad_batch
from .train_batches import EncoderCache, load_clips, tokenize

EVAL_BATCH = 8  # rows per validation batch (no gradients: memory is a few hundred MB at 8 x 12 s)


def _duration(s) -> float:
    return s.duration if s.duration is not None else 0.0


def validation_pass(model, processor, samples, loss: Callable, *, loss_rows: Optional[int] = None,
                    wer_rows: int = 0, options=None, cache: Optional[EncoderCache] = None, max_len=None,
                    batch_size: int = EVAL_BATCH) -> dict:
    """Loss over the first `loss_rows` of `samples` (None: all) and transcripts of the first `wer_rows`.

    Returns:
        {"loss": token-weighted mean loss (nan without loss rows), "tokens": label tokens,
         "wer": corpus scores of the WER rows as `trainer.eval_wer` gives them (absent when wer_rows is 0)}.
    """
    from .decoding import DecodingOptions, decode_memory
    from .metrics import corpus_scores, score

    options = options or DecodingOptions()
    loss_ids = {s.id for s in (samples if loss_rows is None else samples[:loss_rows])}
    wer_ids = {s.id for s in samples[:wer_rows]}
    rows = [s for s in dict((s.id, s) for s in samples).values() if s.id in loss_ids or s.id in wer_ids]
    rows.sort(key=_duration)
    total, count, scored = 0.0, 0, []
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        if cache is not None:
            memory, valid = cache.batch(chunk)
            lengths = np.array([cache.samples[s.id] for s in chunk])
        else:
            x, lengths = pad_batch(load_clips(chunk, processor))  # rows of similar length: little padding
            padded = bool((lengths != x.shape[1]).any())
            memory, valid = model.encode(mx.array(x), mx.array(lengths) if padded else None)
        mx.eval(memory)
        in_loss = [i for i, s in enumerate(chunk) if s.id in loss_ids]
        if in_loss:
            idx = mx.array(in_loss) if len(in_loss) < len(chunk) else None
            tokens, labels = tokenize(processor, [chunk[i].text for i in in_loss], max_len)
            batch = {"tokens": mx.array(tokens), "labels": mx.array(labels),
                     "memory": memory if idx is None else memory[idx],
                     "valid": valid if idx is None or valid is None else valid[idx]}
            value, ntoks = loss(model, batch)
            mx.eval(value, ntoks)
            total += value.item() * ntoks.item()
            count += ntoks.item()
        in_wer = [i for i, s in enumerate(chunk) if s.id in wer_ids]
        if in_wer:
            idx = mx.array(in_wer)
            results = decode_memory(model, processor, memory[idx], None if valid is None else valid[idx],
                                    np.asarray(lengths)[in_wer], options)
            scored += [dict(score(chunk[i].text, r.text), id=chunk[i].id) for i, r in zip(in_wer, results)]
    out = {"loss": total / count if count else float("nan"), "tokens": count}
    if wer_rows:
        wer = corpus_scores(scored)
        wer["samples"] = sorted(scored, key=lambda r: r["id"])
        out["wer"] = wer
    return out
