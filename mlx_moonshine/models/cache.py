"""Decoder KV cache.

Self-attention K/V live in fixed-capacity buffers (B, kv_heads, capacity, head_dim): each step writes
its tokens at `offset` (an mx.array, so the step's graph does not depend on it) and attends over the
whole buffer with a mask hiding the unwritten positions. Shapes therefore stay the same from token to
token and the per-token step compiles once per batch size (`compiled_step`). Buffers grow in blocks of
`KVCache.step` only when a step would run past the capacity (never, when the capacity is the token
budget). Cross-attention K/V depend only on the audio: computed once per utterance (`Model.new_cache`)
and never touched again.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx

NEG = -1e9  # additive mask value for hidden positions (exp underflows to exactly 0)


def round_up(n: int, block: int) -> int:
    return -(-n // block) * block


class KVCache:
    """Self-attention keys/values of one layer: (B, kv_heads, capacity, head_dim) buffers."""

    step = 64  # capacity block; ~10 s of speech is ~65 tokens

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def reserve(self, B: int, H: int, D: int, dtype, end: int) -> None:
        """Make room for `end` positions (zeros past what is written); a no-op when there is room."""
        if end <= self.capacity:
            return
        cap = round_up(end, self.step)
        new_k, new_v = mx.zeros((B, H, cap, D), dtype), mx.zeros((B, H, cap, D), dtype)
        if self.keys is not None:
            old = self.capacity
            new_k[:, :, :old] = self.keys
            new_v[:, :, :old] = self.values
        self.keys, self.values = new_k, new_v

    def update(self, k: mx.array, v: mx.array, offset: mx.array):
        """Write k, v (B, kv_heads, L, head_dim) at positions offset..offset+L-1.

        Returns:
            (keys, values) (B, kv_heads, capacity, head_dim) and the additive mask (L, capacity):
            query i (position offset + i) sees the keys at positions <= its own.
        """
        L = k.shape[2]
        start = offset.reshape(1)
        self.keys = mx.slice_update(self.keys, k, start, axes=(2,))
        self.values = mx.slice_update(self.values, v, start, axes=(2,))
        q_pos = offset + mx.arange(L)[:, None]
        visible = mx.arange(self.capacity)[None, :] <= q_pos
        mask = mx.where(visible, mx.array(0.0, k.dtype), mx.array(NEG, k.dtype))
        return self.keys, self.values, mask

    def reorder(self, index: mx.array):
        if self.keys is not None:
            self.keys, self.values = self.keys[index], self.values[index]


class DecoderCache:
    """Everything the decoder keeps between steps for one batch of utterances."""

    def __init__(self, n_layers: int, cross_kv: list, cross_mask: Optional[mx.array],
                 capacity: int = 0):
        self.self_attn = [KVCache() for _ in range(n_layers)]
        # per layer (k, v): (B, kv_heads, T_audio, head_dim), made contiguous once here: the per-token
        # attention would otherwise re-gather the strided head views of every layer at every step.
        self.cross_kv = [(mx.contiguous(k), mx.contiguous(v)) for k, v in cross_kv]
        self.cross_mask = cross_mask  # (B, 1, 1, T_audio) additive, or None
        self.length = 0  # tokens decoded so far (host copy of `offset`)
        self.offset = mx.array(0, dtype=mx.int32)  # the same, as the array the step graph reads
        if capacity:
            self.reserve(capacity)

    @property
    def capacity(self) -> int:
        return self.self_attn[0].capacity if self.self_attn else 0

    def reserve(self, end: int) -> None:
        """Room for `end` positions in every layer's buffers (shape of the cross K/V: B, heads, -, D)."""
        k = self.cross_kv[0][0] if self.cross_kv else None
        if k is None:
            return
        B, H, _, D = k.shape
        for c in self.self_attn:
            c.reserve(B, H, D, k.dtype, end)

    def advance(self, n: int) -> None:
        self.length += n
        self.offset = mx.array(self.length, dtype=mx.int32)

    def reorder(self, index: mx.array):
        """Select/reorder batch rows (beam search, finished utterances): the one place this happens."""
        for c in self.self_attn:
            c.reorder(index)
        self.cross_kv = [(k[index], v[index]) for k, v in self.cross_kv]
        if self.cross_mask is not None:
            self.cross_mask = self.cross_mask[index]

    # -- the arrays a compiled step takes and gives back -----------------------------------------
    @property
    def buffers(self) -> list:
        return [x for c in self.self_attn for x in (c.keys, c.values)]

    def set_buffers(self, buffers: list) -> None:
        for i, c in enumerate(self.self_attn):
            c.keys, c.values = buffers[2 * i], buffers[2 * i + 1]

    @property
    def state(self):
        out = [x for x in self.buffers if x is not None]
        return out + [x for kv in self.cross_kv for x in kv]


    @classmethod
    def view(cls, offset: mx.array, buffers: list, cross_kv: list, cross_mask: Optional[mx.array]):
        """A cache made of the given arrays (a compiled step's placeholders); capacity from the buffers."""
        cache = cls.__new__(cls)
        cache.self_attn = [KVCache() for _ in range(len(buffers) // 2)]
        cache.set_buffers(buffers)
        cache.cross_kv, cache.cross_mask = cross_kv, cross_mask
        cache.length, cache.offset = 0, offset  # length: only read to reserve, which has room already
        return cache


class CompiledStep:
    """`step(tokens, cache) -> logits (B, L, V)`: `decode(tokens, cache)` as one compiled graph.

    The graph takes the cache's arrays as inputs and returns the updated buffers, which replace the
    old ones before anything is evaluated (so MLX can write them in place). It is traced once per
    batch size and capacity. Whatever `decode` closes over (the model's weights) is captured as a
    constant at trace time: `decoding.decode_step` keeps one per set of weights.
    """

    def __init__(self, decode: Callable):
        def pure(tokens, offset, buffers, cross_kv, cross_mask):
            view = DecoderCache.view(offset, buffers, cross_kv, cross_mask[0] if cross_mask else None)
            logits = decode(tokens, view)
            return logits, view.buffers

        self._fn = mx.compile(pure)

    def __call__(self, tokens: mx.array, cache: DecoderCache) -> mx.array:
        cache.reserve(cache.length + tokens.shape[1])
        mask = [] if cache.cross_mask is None else [cache.cross_mask]  # compile takes arrays, not None
        logits, buffers = self._fn(tokens, cache.offset, cache.buffers, cache.cross_kv, mask)
        cache.set_buffers(buffers)
        cache.advance(tokens.shape[1])
        return logits
