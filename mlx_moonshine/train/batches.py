"""Training batches: teacher-forcing token arrays, audio through the shared `prepare_audio`, augmentation,
padding to few distinct shapes, the in-RAM cache of frozen encoder outputs, and the row order
(length-bucketed batches, a pure function of seed and epoch).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from .. import data as data_lib
from ..audio import MIN_SAMPLES, SAMPLE_RATE, pad_batch, prepare_audio, resample

if TYPE_CHECKING:
    from .config import TrainArgs

IGNORE = -100  # label id excluded from the loss (padding)
AUGMENTS = ("noise", "speed", "timemask")
TOKEN_PAD = 8  # token sequences padded to a multiple of this: fewer distinct shapes to compile
# Length buckets for a compiled step. Every new batch shape costs a trace of the whole step (and on the
# CPU, kernel builds for new layouts), so batches pad up to the next bucket: ~10 audio x ~5 token shapes
# cover a run instead of one per 0.5 s x 8 tokens. The model masks the padding, so the loss is the same.
AUDIO_BUCKETS = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 14.0, 16.0, 20.0, 25.0, 30.0)  # seconds
TOKEN_BUCKETS = (16, 24, 32, 48, 64, 96, 128)  # decoder positions
FRAME_BUCKET = 64  # cached encoder memory: frames padded to a multiple of this (~1.5 s)


def bucket(n: int, buckets, step: int) -> int:
    """The smallest bucket >= n; past the last one, n rounded up to a multiple of `step`."""
    for b in buckets:
        if n <= b:
            return int(b)
    return -(-n // step) * step


def use_buckets(args) -> bool:
    """Pad batches to the length buckets: `args.buckets`, or (None) whenever the step is compiled."""
    from .step import step_compiled

    flag = getattr(args, "buckets", None)
    return step_compiled(getattr(args, "compile", None)) if flag is None else bool(flag)


def tokenize(processor, texts: Sequence[str], max_len: Optional[int] = None, buckets: bool = False):
    """Teacher-forcing arrays for `texts`.

    Returns:
        tokens (B, L) int32 decoder input ([start] + text, padded with eos), labels (B, L) int32
        (text + [eos], padded with IGNORE), with L a multiple of TOKEN_PAD (`buckets`: a TOKEN_BUCKETS
        length, never past `max_len`).
    """
    tok, start, eos = processor.tokenizer, processor.start_id, processor.eos_id
    seqs = [tok.encode(t) for t in texts]
    if max_len is not None:
        seqs = [s[: max_len - 1] for s in seqs]  # room for start/eos within the position limit
    L = max(len(s) + 1 for s in seqs)
    padded = -(-L // TOKEN_PAD) * TOKEN_PAD
    if buckets:
        padded = bucket(L, TOKEN_BUCKETS, TOKEN_PAD)
        if max_len is not None and padded > max_len:
            padded = max(-(-L // TOKEN_PAD) * TOKEN_PAD, L)
    L = padded
    tokens = np.full((len(seqs), L), eos, dtype=np.int32)
    labels = np.full((len(seqs), L), IGNORE, dtype=np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s) + 1] = [start] + s
        labels[i, : len(s) + 1] = s + [eos]
    return tokens, labels


def augment_audio(x: np.ndarray, kinds: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """Speed perturbation (0.9-1.1x), additive noise (15-35 dB SNR), 1-2 time masks (<= 5% each)."""
    if "speed" in kinds:
        factor = rng.uniform(0.9, 1.1)
        # Read the clip as if recorded at factor * 16 kHz: faster speech, higher pitch (Kaldi-style).
        y = resample(x, int(round(SAMPLE_RATE * factor)), SAMPLE_RATE)
        x = y if len(y) >= MIN_SAMPLES else x
    if "noise" in kinds:
        rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) or 1e-4
        snr_db = rng.uniform(15.0, 35.0)
        x = x + (rng.standard_normal(len(x)) * rms / 10 ** (snr_db / 20)).astype(np.float32)
    if "timemask" in kinds:
        x = x.copy()
        for _ in range(rng.integers(1, 3)):
            width = int(rng.uniform(0, 0.05) * len(x))
            start = int(rng.integers(0, max(len(x) - width, 1)))
            x[start:start + width] = 0.0
    return x.astype(np.float32, copy=False)


def load_clips(samples, processor, kinds=(), seed_path=None, positions=None) -> list[np.ndarray]:
    """Model input for each sample through THE shared `prepare_audio`; augmented when `kinds` is set.

    `seed_path` (seed, epoch, batch index) and the rows' `positions` in their batch (default 0, 1, ...; a
    process's shard of a global batch passes its rows' places) make the augmentation a pure function of
    the position.
    """
    clips = [prepare_audio(s.audio_path, processor.audio) for s in samples]
    if kinds:
        positions = range(len(clips)) if positions is None else positions
        clips = [augment_audio(x, kinds, np.random.default_rng([*seed_path, j])) for j, x in zip(positions, clips)]
    return clips


def pad_audio(clips: list[np.ndarray], pad_seconds: float, buckets: bool = False):
    """`audio.pad_batch`, then more zeros up to a multiple of `pad_seconds` or (`buckets`) up to the next
    AUDIO_BUCKETS length; the model masks them."""
    x, lengths = pad_batch(clips)
    step = max(int(pad_seconds * SAMPLE_RATE), 1)
    if buckets:
        n = bucket(x.shape[1], [int(b * SAMPLE_RATE) for b in AUDIO_BUCKETS], step)
    else:
        n = -(-x.shape[1] // step) * step
    if n > x.shape[1]:
        x = np.pad(x, ((0, 0), (0, n - x.shape[1])))
    return x, lengths


class EncoderCache:
    """Frozen encoder outputs per sample id, in RAM: memory (T_i, D) of the valid frames only."""

    def __init__(self, model, processor, pad_seconds: float, batch_size: int = 8, buckets: bool = False):
        self.model, self.processor = model, processor
        self.pad_seconds, self.batch_size = pad_seconds, batch_size
        self.frame_pad = FRAME_BUCKET if buckets else 16  # batches' frame counts: multiples of this
        self.store: dict[str, mx.array] = {}
        self.samples: dict[str, int] = {}  # prepared clip length per id (decoding budgets)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.store.values())

    def _fill(self, samples) -> None:
        todo = [s for s in dict((s.id, s) for s in samples).values() if s.id not in self.store]
        for b in range(0, len(todo), self.batch_size):
            chunk = todo[b:b + self.batch_size]
            x, lengths = pad_audio(load_clips(chunk, self.processor), self.pad_seconds)
            memory, valid = self.model.encode(mx.array(x), mx.array(lengths))
            frames = np.array(valid.sum(axis=1))  # the model's own frame count (Streaming: 50/s, base: ~42/s)
            mx.eval(memory)
            for s, m, t, n in zip(chunk, memory, frames, lengths):
                self.store[s.id] = mx.array(m[: int(t)])
                self.samples[s.id] = int(n)

    def batch(self, samples):
        """(memory (B, T, D) zero-padded, valid (B, T) bool) for `samples`."""
        self._fill(samples)
        mems = [self.store[s.id] for s in samples]
        T = -(-max(m.shape[0] for m in mems) // self.frame_pad) * self.frame_pad  # few distinct shapes
        memory = mx.stack([mx.pad(m, [(0, T - m.shape[0]), (0, 0)]) for m in mems])
        valid = mx.arange(T)[None, :] < mx.array([m.shape[0] for m in mems])[:, None]
        return memory, valid


def make_batch(samples, processor, args, *, cache: Optional[EncoderCache] = None,
               augment_seed=None, max_len: Optional[int] = None, positions=None, buckets: Optional[bool] = None) -> dict:
    """Model inputs for `samples`: tokens, labels and either audio+lengths or cached memory+valid.

    Lengths pad to the buckets when `buckets`, or (None) when `use_buckets(args)`: a compiled step.
    Uncompiled passes (evaluation, the teacher table) want the least padding: buckets=False."""
    buckets = use_buckets(args) if buckets is None else buckets
    tokens, labels = tokenize(processor, [s.text for s in samples], max_len, buckets)
    batch = {"tokens": mx.array(tokens), "labels": mx.array(labels)}
    if cache is not None:
        batch["memory"], batch["valid"] = cache.batch(samples)
        return batch
    kinds = args.augment_kinds if augment_seed is not None else ()
    x, lengths = pad_audio(load_clips(samples, processor, kinds, augment_seed, positions), args.pad_seconds, buckets)
    batch["audio"], batch["lengths"] = mx.array(x), mx.array(lengths)
    return batch


# -- which rows, in which order -------------------------------------------------------------------


def iterate_batches(samples: list[data_lib.Sample], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                    bucket: bool = True, bucket_batches: int = 50) -> Iterator[list[data_lib.Sample]]:
    """Yield batches of samples of similar length (less padding), deterministic per seed.

    Samples are shuffled, cut into chunks of `bucket_batches * batch_size`, each chunk sorted by
    duration and cut into batches; the batch order is then shuffled. Pass seed + epoch for a new
    order each epoch. The last batch may be smaller. Unknown durations sort as 0.

    Args:
        samples: The samples.
        batch_size: Samples per batch.
        shuffle: Shuffle samples and batch order.
        seed: Seed for both shuffles.
        bucket: Sort by duration within chunks.
        bucket_batches: Batches per sorting chunk.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(samples)))
    if shuffle:
        rng.shuffle(order)
    if bucket:
        chunk = batch_size * bucket_batches
        order = [i for c in range(0, len(order), chunk)
                 for i in sorted(order[c:c + chunk], key=lambda i: samples[i].duration or 0.0)]
    batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    for b in batches:
        yield [samples[i] for i in b]


def filter_long(samples, max_seconds, name: str, warnings: list) -> list:
    """The rows of `samples` no longer than `max_seconds` (None: all); what was left out goes to `warnings`."""
    if max_seconds is None:
        return list(samples)
    kept = [s for s in samples if (s.duration or data_lib.sample_duration(s)) <= max_seconds]
    if len(kept) < len(samples):
        warnings.append(f"{name}: left out {len(samples) - len(kept)} clips longer than {max_seconds:g} s")
    if not kept:
        from .config import TrainingError  # config.py imports this module

        raise TrainingError(f"{name}: every clip is longer than max_seconds={max_seconds:g}; raise --max-seconds "
                            "(or set max_seconds: null in the -c YAML to keep every clip)")
    return kept


def rows_of(x) -> list:
    """The samples of a `data.Manifest` or of a list of samples."""
    return list(x.samples) if hasattr(x, "samples") else list(x)


def replay_parts(samples, positions, is_replay: Callable[[object], bool], min_saving: float = 0.1) -> list:
    """A batch's rows as `[(samples, positions)]`: one part, or its domain rows and its replay rows apart.

    Replay clips (general speech) are often longer than domain clips; padded together every domain row
    pays for the longest replay clip. Two micro-batches give the same step (gradients are token-weighted
    sums), so the rows are split when that saves at least `min_saving` of the padded audio (bucketed
    lengths). Metal prefers one bigger batch, which the threshold keeps where lengths are alike.
    """
    replay = [j for j, s in enumerate(samples) if is_replay(s)]
    if not replay or len(replay) == len(samples):
        return [(samples, positions)]
    seconds = [s.duration or data_lib.sample_duration(s) for s in samples]
    padded = lambda idx: len(idx) * bucket(max(seconds[j] for j in idx), AUDIO_BUCKETS, 5.0)  # noqa: E731
    domain = sorted(set(range(len(samples))) - set(replay))
    if padded(domain) + padded(replay) > (1 - min_saving) * padded(range(len(samples))):
        return [(samples, positions)]
    return [([samples[j] for j in idx], [positions[j] for j in idx]) for idx in (domain, replay)]


def epoch_batches(samples, args: TrainArgs, epoch: int, iterate_batches=iterate_batches,
                  replay=None) -> list[list]:
    """The training batches of `epoch`: a pure function of (seed, epoch), replay rows mixed in.

    With replay ratio r, batch k gets round((k+1) * c) - round(k * c) replay rows, c = B * r / (1 - r),
    so replay rows make up a share r of all rows; which rows is a pure function of (seed, epoch, k).
    """
    batches = [list(b) for b in iterate_batches(samples, args.batch_size, shuffle=True, seed=args.seed + epoch)]
    if replay and args.replay_ratio > 0:
        c = args.batch_size * args.replay_ratio / (1 - args.replay_ratio)
        for k, b in enumerate(batches):
            n = round((k + 1) * c) - round(k * c)
            rng = random.Random(f"replay-{args.seed}-{epoch}-{k}")
            b.extend(rng.sample(replay, min(n, len(replay))))
    return batches
