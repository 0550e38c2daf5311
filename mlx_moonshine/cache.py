"""Decoder KV cache.

Self-attention K/V grow by one step per generated token; they live in preallocated buffers that
grow in chunks (no concatenation per token). Cross-attention K/V depend only on the audio, so they
are computed once per utterance (`Model.new_cache`) and never touched again.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx


class KVCache:
    """Self-attention keys/values of one layer: (B, kv_heads, T, head_dim) buffers grown in steps."""

    step = 64  # tokens added per reallocation; ~10 s of speech is ~65 tokens

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0

    def update(self, k: mx.array, v: mx.array):
        """Append k, v (B, kv_heads, L, head_dim); return all keys/values so far."""
        L = k.shape[2]
        end = self.offset + L
        if self.keys is None or end > self.keys.shape[2]:
            B, H, _, D = k.shape
            grow = ((end + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, D), k.dtype)
            new_v = mx.zeros((B, H, grow, D), v.dtype)
            if self.keys is not None:
                new_k[:, :, : self.offset] = self.keys[:, :, : self.offset]
                new_v[:, :, : self.offset] = self.values[:, :, : self.offset]
            self.keys, self.values = new_k, new_v
        self.keys[:, :, self.offset : end] = k
        self.values[:, :, self.offset : end] = v
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def reorder(self, index: mx.array):
        if self.keys is not None:
            self.keys, self.values = self.keys[index], self.values[index]

    @property
    def state(self):
        return [self.keys, self.values]


class DecoderCache:
    """Everything the decoder keeps between steps for one batch of utterances."""

    def __init__(self, n_layers: int, cross_kv: list, cross_mask: Optional[mx.array]):
        self.self_attn = [KVCache() for _ in range(n_layers)]
        # per layer (k, v): (B, kv_heads, T_audio, head_dim), made contiguous once here: the per-token
        # attention would otherwise re-gather the strided head views of every layer at every step.
        self.cross_kv = [(mx.contiguous(k), mx.contiguous(v)) for k, v in cross_kv]
        self.cross_mask = cross_mask  # (B, 1, 1, T_audio) additive, or None
        self.offset = 0  # tokens decoded so far

    def reorder(self, index: mx.array):
        """Select/reorder batch rows (beam search, finished utterances): the one place this happens."""
        for c in self.self_attn:
            c.reorder(index)
        self.cross_kv = [(k[index], v[index]) for k, v in self.cross_kv]
        if self.cross_mask is not None:
            self.cross_mask = self.cross_mask[index]

    @property
    def state(self):
        out = [x for c in self.self_attn for x in c.state if x is not None]
        return out + [x for kv in self.cross_kv for x in kv]
