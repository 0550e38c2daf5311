"""Layers both Moonshine architectures share: activations, rotary embedding, attention, the MLPs and the
whole text decoder (`Decoder`), which Moonshine Streaming reuses as is, and `EncoderDecoder`, the model
contract both top-level models keep (cache, head, Hugging Face weights).

Parameter names are the Hugging Face ones (`self_attn.q_proj`, `encoder_attn`, `fc1`), see moonshine.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import fastmath
from .cache import DecoderCache
from .fastmath import TransposedCopy, linear

if TYPE_CHECKING:
    from .moonshine import ModelArgs


def tied_logits(owner: nn.Module, embed: nn.Embedding, hidden: mx.array) -> mx.array:
    """`embed.as_linear(hidden)`; at inference through a contiguous (D, V) copy kept on `owner`.

    The per-token GEMV over the 32k x D embedding is ~2x faster on the CPU that way (x @ W.T is
    strided); the copy is rebuilt whenever the weight changes. Training takes the plain path.
    """
    if owner.training:
        return embed.as_linear(hidden)
    head = getattr(owner, "_head_t", None)
    if head is None:
        head = owner._head_t = TransposedCopy()
    if head.source is not embed.weight:
        head.source, head.weight_t, head.blocks = embed.weight, mx.contiguous(embed.weight.T), None
    return fastmath.rows_product(hidden, head)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU; a fused polynomial version on the CPU, where erf is scalar and slow."""
    return fastmath.gelu(x) if fastmath.use_fast_cpu_ops() else nn.gelu(x)


def activation(name: str):
    acts = {"gelu": gelu, "silu": nn.silu, "swish": nn.silu, "relu": nn.relu, "tanh": mx.tanh,
            "gelu_new": nn.gelu_approx, "gelu_pytorch_tanh": nn.gelu_approx}
    if name not in acts:
        raise ValueError(f"activation {name!r} is not supported; known: {sorted(acts)}")
    return acts[name]


class RotaryEmbedding(nn.Module):
    """Interleaved (GPT-J style) partial rotary embedding, as transformers' Moonshine/GLM applies it."""

    def __init__(self, head_dim: int, partial_rotary_factor: float, base: float):
        super().__init__()
        dim = int(head_dim * partial_rotary_factor)
        inv_freq = 1.0 / (base ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim))
        # transformers rotates 2 * len(inv_freq) dims; fast.rope wants periods, not frequencies.
        self.dims = 2 * inv_freq.shape[0]
        self._inv_freq = inv_freq
        self._periods = 1.0 / inv_freq
        self._cos = self._sin = None  # (positions, dims / 2) tables for the CPU path
        # Built here, not on first use: a first use inside a compiled step would store the trace's
        # placeholders. 4096 positions cover ~98 s of encoder frames; past them, the tables grow.
        self.reserve(4096)

    def reserve(self, end: int) -> None:
        """Make the cos/sin tables cover positions < end."""
        if self._cos is None or self._cos.shape[0] < end:
            n = 1 << max(end - 1, 1).bit_length()
            angles = mx.arange(n, dtype=mx.float32)[:, None] * self._inv_freq[None, :]
            self._cos, self._sin = mx.cos(angles), mx.sin(angles)

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        # x: (B, heads, L, head_dim); offset: int, or a scalar mx.array (the decoding cache's)
        if fastmath.use_fast_cpu_ops():
            # MLX's CPU rope recomputes cos/sin (scalar libm calls) and splits/concatenates on every call:
            # ~0.2 ms per head tensor at one decoding step, 16 calls a step. A cached table and one fused
            # kernel give the same values (the same float32 angles) in a quarter of the time.
            L = x.shape[2]
            if isinstance(offset, mx.array):
                pos = offset + mx.arange(L)
                return _rope_rotate(x, self._cos[pos], self._sin[pos])
            self.reserve(offset + L)
            return _rope_rotate(x, self._cos[offset:offset + L], self._sin[offset:offset + L])
        return mx.fast.rope(x, self.dims, traditional=True, base=None, scale=1.0, offset=offset,
                            freqs=self._periods)


@mx.compile
def _rope_rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Interleaved rotation of the first 2 * cos.shape[-1] dims of x (B, heads, L, head_dim); cos/sin (L, dims/2)."""
    B, H, L, D = x.shape
    dims = 2 * cos.shape[-1]
    pairs = x[..., :dims].reshape(B, H, L, dims // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(B, H, L, dims).astype(x.dtype)
    return mx.concatenate([rotated, x[..., dims:]], axis=-1) if dims < D else rotated


class Attention(nn.Module):
    def __init__(self, hidden_size: int, n_heads: int, n_kv_heads: int, bias: bool):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = hidden_size // n_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, hidden_size, bias=False)

    def heads(self, x: mx.array, n: int) -> mx.array:
        B, L, _ = x.shape
        return x.reshape(B, L, n, self.head_dim).transpose(0, 2, 1, 3)  # (B, n, L, head_dim)

    def kv(self, x: mx.array):
        return self.heads(linear(self.k_proj, x), self.n_kv_heads), self.heads(linear(self.v_proj, x), self.n_kv_heads)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask) -> mx.array:
        B, _, L, _ = q.shape
        if L > 1 and fastmath.use_fast_cpu_ops():
            out = self._attention_cpu(q, k, v, mask)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return linear(self.o_proj, out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _attention_cpu(self, q, k, v, mask):
        """Same as scaled_dot_product_attention, with the fused polynomial softmax (exp is slow on CPU)."""
        B, H, L, D = q.shape
        S, rep = k.shape[2], self.n_heads // self.n_kv_heads
        q = (q * self.scale).reshape(B, self.n_kv_heads, rep * L, D)  # group query heads per kv head
        scores = (q @ k.swapaxes(-1, -2)).reshape(B, H, L, S)
        if isinstance(mask, str):
            mask = causal_mask(L, S, scores.dtype)
        if mask is not None:
            scores = scores + mask
        probs = fastmath.softmax(scores.astype(mx.float32)).astype(v.dtype)
        return (probs.reshape(B, self.n_kv_heads, rep * L, S) @ v).reshape(B, H, L, D)


class EncoderMLP(nn.Module):
    def __init__(self, dims: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden)
        self.fc2 = nn.Linear(hidden, dims)
        self.act = activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class DecoderMLP(nn.Module):
    """Gated MLP: fc1 yields [value | gate]; act(gate) * value."""

    def __init__(self, dims: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dims, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dims)
        self.act = activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        value, gate = mx.split(linear(self.fc1, x), 2, axis=-1)
        return linear(self.fc2, self.act(gate) * value)


def attention_mask(valid: mx.array, dtype) -> mx.array:
    """(B, T) bool of attendable keys -> additive mask (B, 1, 1, T) for scaled_dot_product_attention."""
    neg = mx.array(-1e9 if dtype == mx.float32 else -3e4, dtype=dtype)
    return mx.where(valid[:, None, None, :], mx.array(0.0, dtype=dtype), neg)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, H, KV = args.hidden_size, args.decoder_num_attention_heads, args.decoder_num_key_value_heads
        self.self_attn = Attention(D, H, KV, args.attention_bias)
        self.encoder_attn = Attention(D, H, KV, args.attention_bias)
        self.mlp = DecoderMLP(D, args.intermediate_size, args.decoder_hidden_act)
        self.input_layernorm = nn.LayerNorm(D, bias=False)
        self.post_attention_layernorm = nn.LayerNorm(D, bias=False)
        self.final_layernorm = nn.LayerNorm(D, bias=False)

    def __call__(self, x, rope, offset, self_cache, cross_kv, cross_mask):
        attn = self.self_attn
        h = self.input_layernorm(x)
        q = rope(attn.heads(linear(attn.q_proj, h), attn.n_heads), offset)
        k, v = attn.kv(h)
        k = rope(k, offset)
        if self_cache is not None:  # fixed-capacity buffers: the mask hides what is not written yet
            k, v, mask = self_cache.update(k, v, offset)
        else:
            mask = "causal" if x.shape[1] > 1 else None
        x = x + attn.attend(q, k, v, mask)

        cross = self.encoder_attn
        h = self.post_attention_layernorm(x)
        q = cross.heads(linear(cross.q_proj, h), cross.n_heads)
        x = x + cross.attend(q, *cross_kv, cross_mask)
        return x + self.mlp(self.final_layernorm(x))


def causal_mask(L: int, total: int, dtype) -> mx.array:
    """(L, total) additive mask: query i (at position total - L + i) sees keys <= its position."""
    q_pos = mx.arange(total - L, total)[:, None]
    return mx.where(mx.arange(total)[None, :] <= q_pos, mx.array(0.0, dtype), mx.array(-1e9, dtype)).astype(dtype)


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D = args.hidden_size
        self.embed_tokens = nn.Embedding(args.vocab_size, D)
        self.layers = [DecoderLayer(args) for _ in range(args.decoder_num_hidden_layers)]
        self.norm = nn.LayerNorm(D, bias=False)
        self.rope = RotaryEmbedding(D // args.decoder_num_attention_heads, args.partial_rotary_factor,
                                    args.rope_theta)

    def cross_kv(self, memory: mx.array) -> list:
        """Cross-attention K/V of every layer: computed once per utterance."""
        return [layer.encoder_attn.kv(memory) for layer in self.layers]

    def __call__(self, tokens, cross_kv, cross_mask, cache: Optional[DecoderCache]):
        offset = 0
        if cache is not None:
            offset = cache.offset  # an mx.array: the same graph at every position
            self.rope.reserve(cache.capacity)
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            self_cache = cache.self_attn[i] if cache is not None else None
            x = layer(x, self.rope, offset, self_cache, cross_kv[i], cross_mask)
        return self.norm(x)


class EncoderDecoder(nn.Module):
    """What every Moonshine model shares around its encoder and decoder: the decoding cache, the output
    head and reading a Hugging Face state dict.

    The contract decoding, training, export and the benchmarks call, the same for every architecture:
        memory, valid = model.encode(input_values, lengths)        # audio (B, N), valid samples (B,)
        cache = model.new_cache(memory, valid)                     # once per utterance
        logits, cache = model.decode(tokens, memory, valid, cache)  # cache=None: one uncached pass
        logits = model(input_values, decoder_input_ids, attention_mask)

    Subclasses define `encode`, pass their args and inner `model` (holding `.encoder` and `.decoder`) to
    `__init__`, and set `CONV_PREFIX`, where their conv kernels live.
    """

    CONV_PREFIX = "model.encoder.conv"

    def __init__(self, args, model: nn.Module):
        """`args` needs `model_type`, `hidden_size`, `vocab_size` and `tie_word_embeddings`; an untied
        checkpoint gets its own output head `proj_out`."""
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = model
        if not args.tie_word_embeddings:
            self.proj_out = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def new_cache(self, memory: mx.array, memory_valid: Optional[mx.array] = None) -> DecoderCache:
        """A decoding cache for this utterance: per-layer self-attention K/V buffers (fixed capacity, grown
        in blocks when full) plus the cross-attention K/V and key mask, computed here, once."""
        mask = None if memory_valid is None else attention_mask(memory_valid, memory.dtype)
        return DecoderCache(len(self.model.decoder.layers), self.model.decoder.cross_kv(memory), mask)

    def decode(self, tokens: mx.array, memory: Optional[mx.array] = None,
               memory_valid: Optional[mx.array] = None, cache: Optional[DecoderCache] = None):
        """Tokens (B, L) -> (logits (B, L, V), cache).

        Without a cache: one full, uncached pass over `memory` (what training differentiates); the cache
        returned is None. With a cache from `new_cache()`: incremental decoding, the cache grows by L tokens.
        """
        decoder = self.model.decoder
        if cache is None:
            cross_mask = None if memory_valid is None else attention_mask(memory_valid, memory.dtype)
            return self.logits(decoder(tokens, decoder.cross_kv(memory), cross_mask, None)), None
        cache.reserve(cache.length + tokens.shape[1])
        h = decoder(tokens, cache.cross_kv, cache.cross_mask, cache)
        cache.advance(tokens.shape[1])
        return self.logits(h), cache

    def __call__(self, input_values: mx.array, decoder_input_ids: mx.array,
                 attention_mask: Optional[mx.array] = None) -> mx.array:
        """Like transformers' forward: audio (B, N), tokens (B, L), sample mask (B, N) -> logits (B, L, V)."""
        lengths = None if attention_mask is None else attention_mask.astype(mx.int32).sum(axis=-1)
        memory, valid = self.encode(input_values, lengths)
        return self.decode(decoder_input_ids, memory, valid)[0]

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return tied_logits(self, self.model.decoder.embed_tokens, hidden)
        return linear(self.proj_out, hidden)

    def sanitize(self, weights: dict[str, Any]) -> dict[str, Any]:
        """Hugging Face state dict -> MLX: drop buffers (and a tied head), transpose conv kernels from torch
        (out, in, kernel) to MLX (out, kernel, in); MLX-layout kernels pass unchanged."""
        expected = dict(tree_flatten(self.parameters()))
        out = {}
        for key, value in weights.items():
            if "rotary_emb" in key or key.endswith("inv_freq"):
                continue
            if key == "proj_out.weight" and self.args.tie_word_embeddings:
                continue
            if key.startswith(self.CONV_PREFIX) and key.endswith(".weight") and value.ndim == 3:
                if key in expected and tuple(value.shape) != tuple(expected[key].shape):
                    value = value.transpose(0, 2, 1)
            out[key] = value
        return out
