"""Moonshine (tiny/base) encoder-decoder in MLX, numerically matching transformers'
`MoonshineForConditionalGeneration`.

Module paths and parameter names are the Hugging Face ones (`model.encoder.layers.0.self_attn.q_proj`,
`model.decoder.layers.0.encoder_attn.v_proj`, ...) so that loading only transposes convolutions and
PEFT adapter keys map one to one.

Seams: the `layers.EncoderDecoder` contract (encode, new_cache, decode, logits, sanitize), the one that
decoding, training, export and the benchmarks call, the same for Moonshine Streaming.

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

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import fastmath
from .args import ArgsBase, rope_parameters
from .layers import Attention, Decoder, EncoderDecoder, EncoderMLP, RotaryEmbedding, attention_mask, gelu

# Encoder conv stem: (kernel, stride) of conv1..conv3; 64 * 3 * 2 = 384 samples per frame (24 ms at 16 kHz).
CONV_STEM = ((127, 64), (7, 3), (3, 2))


@dataclass
class ModelArgs(ArgsBase):
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

    def to_dict(self) -> dict:
        """A `config.json` transformers can load (unknown keys from the source kept)."""
        out = super().to_dict()
        out["rope_parameters"] = rope_parameters(self.rope_theta, self.partial_rotary_factor)
        out.setdefault("architectures", ["MoonshineForConditionalGeneration"])
        out["is_encoder_decoder"] = True
        return out


def frame_lengths(num_samples: mx.array) -> mx.array:
    """Valid encoder frames for clips of `num_samples` samples (exact conv arithmetic, floor division)."""
    n = num_samples
    for kernel, stride in CONV_STEM:
        n = mx.maximum((n - kernel) // stride + 1, 0)
    return n


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
        x = gelu(self.conv2(x))
        x = gelu(self.conv3(x))  # (B, T, D)

        valid, mask = None, None
        if lengths is not None:
            valid = mx.arange(x.shape[1])[None, :] < frame_lengths(lengths)[:, None]  # (B, T)
            mask = attention_mask(valid, x.dtype)
        for layer in self.layers:
            x = layer(x, self.rope, mask)
        return self.layer_norm(x), valid


class MoonshineModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.encoder = Encoder(args)
        self.decoder = Decoder(args)


class Model(EncoderDecoder):
    """`MoonshineForConditionalGeneration` in MLX."""

    def __init__(self, args: ModelArgs):
        super().__init__(args, MoonshineModel(args))

    # -- seams ------------------------------------------------------------------------------------
    def encode(self, input_values: mx.array, lengths: Optional[mx.array] = None):
        """Audio (B, N) float (+ valid sample counts (B,)) -> (memory (B, T, D), valid (B, T) or None)."""
        return self.model.encoder(input_values, lengths)
