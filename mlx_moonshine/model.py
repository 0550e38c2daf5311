"""Moonshine (tiny/base) encoder-decoder in MLX, numerically matching transformers'
`MoonshineForConditionalGeneration`.

Module paths and parameter names are the Hugging Face ones (`model.encoder.layers.0.self_attn.q_proj`,
`model.decoder.layers.0.encoder_attn.v_proj`, ...) so that loading only transposes convolutions and
PEFT adapter keys map one to one.

Three seams, used by decoding, training and benchmarks alike:
    memory, memory_mask = model.encode(input_values, lengths)     # once per utterance
    logits, cache = model.decode(tokens, memory, memory_mask, cache)
    logits = model(input_values, decoder_input_ids, attention_mask)  # = encode + decode

Where MLX and transformers differ (only on *padded* batches; unpadded inputs match):
  * transformers' single-group GroupNorm after conv1 takes its statistics over the zero padding too,
    so a short clip in a batch of long ones is normalised differently than alone. Here the statistics
    cover the valid frames only.
  * transformers downsamples the sample mask by taking every 384th value, which marks up to two frames
    past the last real conv output as valid. Here the valid length is computed exactly from the conv
    arithmetic (`frame_lengths`).
  * transformers 5.x reshapes queries with the key/value head count, so GQA configs
    (`*_num_key_value_heads < *_num_attention_heads`) crash there; MLX handles GQA natively.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import fastmath
from .fastmath import TransposedCopy, linear  # noqa: F401  (linear: shared with streaming.py)
from .cache import DecoderCache

fastmath.configure_cpu_cache()

# Encoder conv stem: (kernel, stride) of conv1..conv3; 64 * 3 * 2 = 384 samples per frame (24 ms at 16 kHz).
CONV_STEM = ((127, 64), (7, 3), (3, 2))


@dataclass
class ModelArgs:
    """Configuration read from a Moonshine `config.json`; unknown keys are ignored."""

    vocab_size: int = 32768
    hidden_size: int = 288
    intermediate_size: int = 1152
    encoder_num_hidden_layers: int = 6
    decoder_num_hidden_layers: int = 6
    encoder_num_attention_heads: int = 8
    decoder_num_attention_heads: int = 8
    encoder_num_key_value_heads: Optional[int] = None  # None: same as the attention heads (MHA)
    decoder_num_key_value_heads: Optional[int] = None
    # transformers pads head_dim with zeros to this multiple for fused kernels: a numerical no-op
    # (scale uses the unpadded size), so MLX reads it but does not pad.
    pad_head_dim_to_multiple_of: Optional[int] = None
    encoder_hidden_act: str = "gelu"
    decoder_hidden_act: str = "silu"
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.9  # rotate only the first 90% of each head (tiny: 0.9, base: 0.62)
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 1
    pad_token_id: Optional[int] = None
    model_type: str = "moonshine"
    extra: dict = field(default_factory=dict, repr=False)  # the unknown keys, kept for save()

    def __post_init__(self):
        if self.encoder_num_key_value_heads is None:
            self.encoder_num_key_value_heads = self.encoder_num_attention_heads
        if self.decoder_num_key_value_heads is None:
            self.decoder_num_key_value_heads = self.decoder_num_attention_heads
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0]

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        config = dict(config)
        # transformers >= 5 nests rotary settings in rope_parameters; older configs keep them flat.
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        for key in ("rope_theta", "partial_rotary_factor"):
            if key not in config and key in rope:
                config[key] = rope[key]
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"rope_type {rope['rope_type']!r} is not supported (only 'default')")
        names = inspect.signature(cls).parameters
        known = {k: v for k, v in config.items() if k in names and k != "extra"}
        extra = {k: v for k, v in config.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        """A `config.json` transformers can load (unknown keys from the source kept)."""
        out = dict(self.extra)
        for name in inspect.signature(type(self)).parameters:
            if name != "extra":
                out[name] = getattr(self, name)
        out["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
        }
        out.setdefault("architectures", ["MoonshineForConditionalGeneration"])
        out["is_encoder_decoder"] = True
        return out


def frame_lengths(num_samples: mx.array) -> mx.array:
    """Valid encoder frames for clips of `num_samples` samples (exact conv arithmetic, floor division)."""
    n = num_samples
    for kernel, stride in CONV_STEM:
        n = mx.maximum((n - kernel) // stride + 1, 0)
    return n


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
        head.source, head.weight_t = embed.weight, mx.contiguous(embed.weight.T)
    return hidden @ head.weight_t


def _gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU; a fused polynomial version on the CPU, where erf is scalar and slow."""
    return fastmath.gelu(x) if fastmath.use_fast_cpu_ops() else nn.gelu(x)


def _activation(name: str):
    acts = {"gelu": _gelu, "silu": nn.silu, "swish": nn.silu, "relu": nn.relu, "tanh": mx.tanh,
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


class EncoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D = args.hidden_size
        self.self_attn = Attention(D, args.encoder_num_attention_heads, args.encoder_num_key_value_heads,
                                   args.attention_bias)
        self.mlp = EncoderMLP(D, args.intermediate_size, args.encoder_hidden_act)
        self.input_layernorm = nn.LayerNorm(D, bias=False)
        self.post_attention_layernorm = nn.LayerNorm(D, bias=False)

    def __call__(self, x: mx.array, rope: RotaryEmbedding, mask) -> mx.array:
        h = self.input_layernorm(x)
        attn = self.self_attn
        q = rope(attn.heads(attn.q_proj(h), attn.n_heads))
        k, v = attn.kv(h)
        x = x + attn.attend(q, rope(k), v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class EncoderMLP(nn.Module):
    def __init__(self, dims: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden)
        self.fc2 = nn.Linear(hidden, dims)
        self.act = _activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class DecoderMLP(nn.Module):
    """Gated MLP: fc1 yields [value | gate]; act(gate) * value."""

    def __init__(self, dims: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dims, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dims)
        self.act = _activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        value, gate = mx.split(linear(self.fc1, x), 2, axis=-1)
        return linear(self.fc2, self.act(gate) * value)


class Encoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D = args.hidden_size
        (k1, s1), (k2, s2), (k3, s3) = CONV_STEM
        self.conv1 = nn.Conv1d(1, D, kernel_size=k1, stride=s1, bias=False)
        self.conv2 = nn.Conv1d(D, 2 * D, kernel_size=k2, stride=s2)
        self.conv3 = nn.Conv1d(2 * D, D, kernel_size=k3, stride=s3)
        self.groupnorm = nn.GroupNorm(1, D, pytorch_compatible=True)
        self.layers = [EncoderLayer(args) for _ in range(args.encoder_num_hidden_layers)]
        self.layer_norm = nn.LayerNorm(D, bias=False)
        self.rope = RotaryEmbedding(D // args.encoder_num_attention_heads, args.partial_rotary_factor,
                                    args.rope_theta)

    def _groupnorm(self, x: mx.array, valid: Optional[mx.array]) -> mx.array:
        """GroupNorm(1 group) whose statistics cover each clip's valid frames only.

        x: (B, T, D); valid: (B, T) bool or None (all frames valid). Sums run over time first, then
        channels: one fp32 sum over all T x D values (500k for 20 s) loses ~0.2% of the variance.
        """
        gn = self.groupnorm
        xf = x.astype(mx.float32)
        if valid is None:  # (x * c ** 2 would be a scalar pow per value on the CPU: multiply instead)
            count = mx.full((x.shape[0],), float(x.shape[1] * x.shape[2]))
            mean = xf.sum(axis=1).sum(axis=-1) / count
            centered = xf - mean[:, None, None]
            var = (centered * centered).sum(axis=1).sum(axis=-1) / count
        else:
            m = valid[..., None].astype(mx.float32)
            count = mx.maximum(m.sum(axis=(1, 2)) * x.shape[-1], 1.0)  # (B,) values per clip
            mean = (xf * m).sum(axis=1).sum(axis=-1) / count
            centered = xf - mean[:, None, None]
            cm = centered * m
            var = (cm * cm).sum(axis=1).sum(axis=-1) / count
        y = centered * mx.rsqrt(var + gn.eps)[:, None, None]
        return (y * gn.weight + gn.bias).astype(x.dtype)

    def __call__(self, input_values: mx.array, lengths: Optional[mx.array] = None):
        """input_values: (B, N) samples; lengths: (B,) valid samples or None (all valid).

        Returns (hidden (B, T, D), valid (B, T) bool or None).
        """
        x = input_values[..., None].astype(self.conv1.weight.dtype)  # (B, N, 1)
        x = self.conv1(x)  # (B, T1, D)
        x = fastmath.tanh(x) if fastmath.use_fast_cpu_ops() else mx.tanh(x)
        valid1 = None
        if lengths is not None:
            n1 = mx.maximum((lengths - CONV_STEM[0][0]) // CONV_STEM[0][1] + 1, 0)
            valid1 = mx.arange(x.shape[1])[None, :] < n1[:, None]
        x = self._groupnorm(x, valid1)
        x = _gelu(self.conv2(x))
        x = _gelu(self.conv3(x))  # (B, T, D)

        valid, mask = None, None
        if lengths is not None:
            valid = mx.arange(x.shape[1])[None, :] < frame_lengths(lengths)[:, None]  # (B, T)
            mask = attention_mask(valid, x.dtype)
        for layer in self.layers:
            x = layer(x, self.rope, mask)
        return self.layer_norm(x), valid


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


class MoonshineModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.encoder = Encoder(args)
        self.decoder = Decoder(args)


class Model(nn.Module):
    """`MoonshineForConditionalGeneration` in MLX."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = MoonshineModel(args)
        if not args.tie_word_embeddings:
            self.proj_out = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    # -- seams ------------------------------------------------------------------------------------
    def encode(self, input_values: mx.array, lengths: Optional[mx.array] = None):
        """Audio (B, N) float (+ valid sample counts (B,)) -> (memory (B, T, D), valid (B, T) or None)."""
        return self.model.encoder(input_values, lengths)

    def new_cache(self, memory: mx.array, memory_valid: Optional[mx.array] = None) -> DecoderCache:
        """A decoding cache holding this utterance's cross-attention K/V (computed here, once)."""
        mask = None if memory_valid is None else attention_mask(memory_valid, memory.dtype)
        return DecoderCache(len(self.model.decoder.layers), self.model.decoder.cross_kv(memory), mask)

    def decode(self, tokens: mx.array, memory: Optional[mx.array] = None,
               memory_valid: Optional[mx.array] = None, cache: Optional[DecoderCache] = None):
        """Tokens (B, L) -> (logits (B, L, V), cache).

        Pass `memory` (and `memory_valid`) without a cache for a full, uncached pass, or a cache from
        `new_cache()` (which then grows by L tokens) for incremental decoding.
        """
        if cache is None:
            cross_kv = self.model.decoder.cross_kv(memory)
            cross_mask = None if memory_valid is None else attention_mask(memory_valid, memory.dtype)
            h = self.model.decoder(tokens, cross_kv, cross_mask, None)
        else:
            cache.reserve(cache.length + tokens.shape[1])
            h = self.model.decoder(tokens, cache.cross_kv, cache.cross_mask, cache)
            cache.advance(tokens.shape[1])
        return self.logits(h), cache

    def logits(self, hidden: mx.array) -> mx.array:
        if not self.args.tie_word_embeddings:
            return linear(self.proj_out, hidden)
        return tied_logits(self, self.model.decoder.embed_tokens, hidden)

    def __call__(self, input_values: mx.array, decoder_input_ids: mx.array,
                 attention_mask: Optional[mx.array] = None) -> mx.array:
        """Like transformers' forward: audio (B, N), tokens (B, L), sample mask (B, N) -> logits (B, L, V)."""
        lengths = None if attention_mask is None else attention_mask.astype(mx.int32).sum(axis=-1)
        memory, valid = self.encode(input_values, lengths)
        return self.decode(decoder_input_ids, memory, valid)[0]

    # -- weights ----------------------------------------------------------------------------------
    def sanitize(self, weights: dict[str, Any]) -> dict[str, Any]:
        """Hugging Face state dict -> MLX: drop buffers and the tied head, transpose conv kernels."""
        out = {}
        for key, value in weights.items():
            if "rotary_emb" in key or key.endswith("inv_freq"):
                continue
            if key == "proj_out.weight" and self.args.tie_word_embeddings:
                continue
            if key.startswith("model.encoder.conv") and key.endswith(".weight") and value.ndim == 3:
                # torch Conv1d (out, in, kernel) -> MLX (out, kernel, in); already-MLX layouts stay.
                expected = dict(tree_flatten(self.parameters()))[key].shape
                if tuple(value.shape) != tuple(expected):
                    value = value.transpose(0, 2, 1)
            out[key] = value
        return out

