"""One decoder for transcribe, eval and in-training evaluation.

`DecodingOptions` is frozen and validated once; it is written into every result file so that a
baseline and a tuned model are only ever compared under the same settings. Greedy and beam search
share one loop (`decode_batch`) and differ only in `update`/`finalize`; beam search reorders the KV
cache in one place (`DecoderCache.reorder`).

Moonshine has no end-of-audio feature besides the learned </s>, and can loop on repeated words; every
utterance therefore gets a token budget of ceil(max_tokens_per_second x seconds) (upstream issue #89:
~6.5 tokens per second of speech), floored at `min_token_budget` and capped at `max_new_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .audio import SAMPLE_RATE, pad_batch
from .models.cache import CompiledStep
from .options import DecodingError, DecodingOptions  # noqa: F401  (the decoder's own names)


def decoder_token_limit(model) -> Optional[int]:
    """Most tokens the decoder was built for (its position table), or None if it states none."""
    args = getattr(model, "args", None)
    if getattr(args, "model_type", None) == "moonshine":
        return int(args.max_position_embeddings)
    return None  # Moonshine Streaming's max_position_embeddings counts encoder frames, not tokens


def budget_warning(options: "DecodingOptions", model) -> Optional[str]:
    """A warning when the user asked for more new tokens than the decoder's limit (they get the limit)."""
    limit = decoder_token_limit(model)
    if limit is None or options.max_new_tokens <= limit or options.max_new_tokens == DecodingOptions.max_new_tokens:
        return None
    return (f"--max-new-tokens {options.max_new_tokens} is more than this model's decoder takes "
            f"(max_position_embeddings {limit}); each transcript is capped at {limit} tokens")


@dataclass
class DecodeResult:
    tokens: list  # generated ids, without the start token and </s>
    text: str
    score: Optional[float] = None  # beam search: the ranking score
    truncated: bool = False  # stopped by the token budget, not by </s>


class GreedyStrategy:
    """argmax per step (no softmax needed). Finished utterances leave the batch (and the KV cache)."""

    pipelined = True  # takes its tokens one step late (`accept`): decode_memory queues the next step first

    def __init__(self, n_audio: int, eos: int):
        self.beam = 1
        self.eos = eos
        self.sequences = [[] for _ in range(n_audio)]
        self.finished = np.zeros(n_audio, dtype=bool)
        self.truncated = np.zeros(n_audio, dtype=bool)
        self.rows = np.arange(n_audio)  # the utterance behind each row still being decoded

    def live_sequences(self) -> list:
        return [self.sequences[a] for a in self.rows]

    def update(self, logits: mx.array, budget_left: np.ndarray, cache) -> np.ndarray:
        """logits (rows, V) -> next input tokens for the rows still decoding."""
        next_tokens = np.array(mx.argmax(logits, axis=-1)).astype(np.int64)
        keep = self.accept(next_tokens, budget_left)
        if keep is not None:
            cache.reorder(mx.array(np.flatnonzero(keep)))
            next_tokens = next_tokens[keep]
        return next_tokens

    def accept(self, next_tokens: np.ndarray, budget_left: np.ndarray) -> Optional[np.ndarray]:
        """Take each live row's token; the mask of rows that go on when some (not all) finished, else None."""
        for tok, a in zip(next_tokens, self.rows):
            if tok == self.eos:
                self.finished[a] = True
            else:
                self.sequences[a].append(int(tok))
                if budget_left[a] <= 1:
                    self.finished[a] = self.truncated[a] = True
        keep = ~self.finished[self.rows]
        if keep.any() and not keep.all():
            self.rows = self.rows[keep]
            return keep
        return None

    def done(self) -> bool:
        return bool(self.finished.all())

    def finalize(self):
        return [(seq, None, bool(t)) for seq, t in zip(self.sequences, self.truncated)]


class BeamSearchStrategy:
    """Beam search over `beam` rows per audio; finished hypotheses are collected until `beam` exist."""

    pipelined = False  # the next inputs depend on the host's ranking of this step's candidates

    def __init__(self, n_audio: int, eos: int, beam: int, length_penalty: Optional[float]):
        self.beam = beam
        self.eos = eos
        self.length_penalty = length_penalty
        self.sum_logprobs = np.zeros(n_audio * beam)
        self.sum_logprobs[np.arange(n_audio * beam) % beam != 0] = -np.inf  # start from one live beam
        self.sequences = [[] for _ in range(n_audio * beam)]
        self.finished = [[] for _ in range(n_audio)]  # (tokens, sum_logprob, truncated)
        self.closed = np.zeros(n_audio, dtype=bool)

    def live_sequences(self) -> list:
        return self.sequences

    def score(self, tokens, sum_logprob) -> float:
        length = max(len(tokens), 1)
        if self.length_penalty is None:
            return sum_logprob / length
        return sum_logprob / (((5 + length) / 6) ** self.length_penalty)

    def update(self, logits: mx.array, budget_left: np.ndarray, cache) -> np.ndarray:
        B = self.beam
        logprobs = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), axis=-1, keepdims=True)
        k = B + 1
        top = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
        top_lp = mx.take_along_axis(logprobs, top, axis=-1)
        top, top_lp = np.array(top), np.array(top_lp)
        source = np.arange(len(self.sequences))
        next_tokens = np.full(len(self.sequences), self.eos, dtype=np.int64)
        new_sequences = list(self.sequences)
        new_sums = np.full_like(self.sum_logprobs, -np.inf)
        for a in range(len(self.finished)):
            rows = range(a * B, (a + 1) * B)
            if self.closed[a]:
                continue
            cands = sorted(((self.sum_logprobs[r] + top_lp[r, j], r, int(top[r, j]))
                            for r in rows for j in range(k) if np.isfinite(self.sum_logprobs[r])),
                           reverse=True)
            slot = a * B
            for total, r, tok in cands:
                # Only candidates ranked above the B-th live beam count: a low-ranked </s> must not
                # finish the search (with B = 1 this is exactly greedy).
                if slot == (a + 1) * B:
                    break
                if tok == self.eos:
                    if len(self.finished[a]) < B:
                        self.finished[a].append((self.sequences[r], total, False))
                    continue
                source[slot] = r
                new_sequences[slot] = self.sequences[r] + [tok]
                new_sums[slot] = total
                next_tokens[slot] = tok
                slot += 1
            if len(self.finished[a]) >= B or budget_left[a * B] <= 1:
                # Budget spent: live beams become (truncated) candidates too.
                if len(self.finished[a]) < B:
                    for r in range(a * B, slot):
                        self.finished[a].append((new_sequences[r], new_sums[r], True))
                self.closed[a] = True
        self.sequences, self.sum_logprobs = new_sequences, new_sums
        if not np.array_equal(source, np.arange(len(source))):
            cache.reorder(mx.array(source))
        return next_tokens

    def done(self) -> bool:
        return bool(self.closed.all())

    def finalize(self):
        out = []
        for a, cands in enumerate(self.finished):
            if not cands:  # never closed (cannot happen with a budget, but stay safe)
                r = a * self.beam
                cands = [(self.sequences[r], self.sum_logprobs[r], True)]
            best = max(cands, key=lambda c: self.score(c[0], c[1]))
            out.append((best[0], float(self.score(best[0], best[1])), best[2]))
        return out


def _banned_ngram_tokens(seq: list, n: int) -> set:
    """Tokens that would repeat an n-gram already present in `seq`."""
    if n <= 0 or len(seq) < n:
        return set()
    prefix = tuple(seq[-(n - 1):]) if n > 1 else ()
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i:i + n - 1]) == prefix}


def decode_batch(model, processor, audios: Sequence[np.ndarray],
                 options: DecodingOptions = DecodingOptions(), *, compile: bool = True) -> list[DecodeResult]:
    """Transcribe a batch of prepared 16 kHz clips (see `audio.prepare_audio`) in one encoder pass.

    Clips are right-padded; the encoder masks the padding, so each result equals the clip decoded alone.
    The per-token step runs as one compiled graph (`decode_step`; `compile=False`: eagerly, the
    same tokens), traced once per batch size: rows leave the batch as they finish.
    """
    x, lengths = pad_batch(list(audios))
    padded = bool((lengths != x.shape[1]).any())
    memory, valid = model.encode(mx.array(x), mx.array(lengths) if padded else None)
    return decode_memory(model, processor, memory, valid, lengths, options, compile=compile)


def decode_memory(model, processor, memory: mx.array, valid: Optional[mx.array], lengths: np.ndarray,
                  options: DecodingOptions = DecodingOptions(), *, compile: bool = True) -> list[DecodeResult]:
    """`decode_batch` after the encoder: memory (B, T, D), valid (B, T) bool or None, lengths (B,) in samples
    (they set the token budgets). Validation decodes the encoder outputs its loss pass computed."""
    n_audio = memory.shape[0]
    beam = options.beam_size
    eos, start = processor.eos_id, processor.start_id
    if beam > 1:
        rows = mx.array(np.repeat(np.arange(n_audio), beam))
        memory = memory[rows]
        valid = valid[rows] if valid is not None else None
        strategy = BeamSearchStrategy(n_audio, eos, beam, options.length_penalty)
    else:
        strategy = GreedyStrategy(n_audio, eos)
    budgets = np.repeat([options.token_budget(n / SAMPLE_RATE) for n in lengths], beam)
    limit = decoder_token_limit(model)
    if limit is not None:  # past its position table the decoder only loops, and its KV cache keeps growing
        budgets = np.minimum(budgets, limit)
    n_steps = int(budgets.max())
    cache = model.new_cache(memory, valid)
    cache.reserve(n_steps)  # one capacity for the whole loop: the step keeps its shape
    # The first step for a set of weights runs eagerly: it builds the weight copies and tables the compiled
    # graph then captures as constants. Once they exist (`primed`), every step runs compiled.
    eager = lambda t, c: model.decode(t, cache=c)[0]  # noqa: E731
    held = decode_step(model) if compile else None
    compiled = held.step if held is not None else eager
    first = compiled if held is not None and held.primed else eager
    tokens = np.full(n_audio * beam, start, dtype=np.int64)
    if held is not None and strategy.pipelined and not options.no_repeat_ngram_size:  # the n-gram ban reads tokens
        _greedy_pipelined(compiled, first, cache, tokens, budgets, n_steps, options, eos, strategy)
    else:
        for step in range(n_steps):
            logits = (compiled if step else first)(mx.array(tokens[:, None]), cache)
            logits = logits[:, -1, :]  # (N, V)
            logits = _filter_logits(logits, step, options, eos, strategy.live_sequences())
            tokens = strategy.update(logits, budgets - step, cache)
            if strategy.done():
                break
    if held is not None:
        held.primed = True
    return [DecodeResult(tokens=seq, text=processor.tokenizer.decode(seq), score=score, truncated=trunc)
            for seq, score, trunc in strategy.finalize()]


def _greedy_pipelined(compiled, first, cache, tokens: np.ndarray, budgets: np.ndarray, n_steps: int,
                      options: DecodingOptions, eos: int, strategy: GreedyStrategy) -> None:
    """The greedy loop with the host one step behind: step s+1 is queued (`mx.async_eval`) before step s's
    tokens are read, so reading them, the strategy and building the next graph overlap the step itself.

    The same tokens as the plain loop: the next input is the argmax on the device, and rows that finished at
    step s are dropped from the cache (and from step s+1's tokens) before step s+2 is queued; their share of
    the step already queued is computed and thrown away.
    """
    def launch(step: int, y: mx.array) -> mx.array:
        logits = (compiled if step else first)(y[:, None], cache)[:, -1, :]
        nxt = mx.argmax(_filter_logits(logits, step, options, eos, None), axis=-1)
        mx.async_eval(nxt)
        return nxt

    pending = launch(0, mx.array(tokens))
    for step in range(n_steps):
        queued = launch(step + 1, pending) if step + 1 < n_steps else None
        keep = strategy.accept(np.array(pending).astype(np.int64), budgets - step)
        if strategy.done() or queued is None:
            return
        if keep is not None:
            rows = mx.array(np.flatnonzero(keep))
            cache.reorder(rows)
            queued = queued[rows]
        pending = queued


class _StepCache:
    """The compiled decoding step of a model, the weight arrays it captured (a plain attribute), and whether
    an eager step has built the weight copies it captures (`primed`)."""

    weights: tuple = ()
    step: Optional[CompiledStep] = None
    primed: bool = False


def decode_step(model) -> _StepCache:
    """The model's compiled per-token step (`.step`), rebuilt when any weight array changed (training, fuse, cast).

    A trace is not free, so the step lives across `decode_batch` calls (kept on the model); a trace captures
    the weights (and their transposed copies) as constants, so new weights need a new step.
    """
    from .models import fastmath

    # The trace also bakes in train/eval mode (adapter dropout) and which kernels the CPU uses.
    weights = (model.training, fastmath.use_fast_cpu_ops(), *(v for _, v in tree_flatten(model.parameters())))
    held = getattr(model, "_decode_step", None)
    if held is None or len(held.weights) != len(weights) or any(a is not b for a, b in zip(held.weights, weights)):
        held = _StepCache()
        held.weights, held.step = weights, CompiledStep(lambda t, c: model.decode(t, cache=c)[0])
        model._decode_step = held
    return held


def _filter_logits(logits: mx.array, step: int, options: DecodingOptions, eos: int, sequences) -> mx.array:
    if options.suppress_blank and step == 0:
        logits[:, eos] = -mx.inf
    n = options.no_repeat_ngram_size
    if n:
        banned = [_banned_ngram_tokens(seq, n) for seq in sequences]
        if any(banned):
            mask = np.zeros(logits.shape, dtype=np.float32)
            for row, toks in enumerate(banned):
                mask[row, list(toks)] = -np.inf
            logits = logits + mx.array(mask, dtype=logits.dtype)
    return logits
