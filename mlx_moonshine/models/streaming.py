"""Moonshine Streaming (Moonshine v2) encoder-decoder in MLX, numerically matching transformers'
`MoonshineStreamingForConditionalGeneration`.

Architecture (parameter names are the Hugging Face ones, so loading only transposes two convs):
    model.encoder.embedder    80-sample (5 ms) frames -> per-frame CMVN -> asinh(exp(log_k) * x)
                              -> linear(80 -> D_enc) -> SiLU -> two causal convs (k=5, s=2, SiLU between):
                              one encoder frame per 320 samples (20 ms, 50 Hz)
    model.encoder.layers.i    pre-norm transformer, no positional encoding, sliding-window attention:
                              `sliding_windows[i] = (left, right)` lets frame q see keys k with
                              q - left < k < q + right (left - 1 frames back, right - 1 ahead)
    model.encoder.final_norm  LayerNorm without bias whose scale is stored as `gamma` with unit offset
    model.decoder             the Moonshine decoder (rotary self-attention, cross-attention, gated MLP)
                              plus an adapter on the encoder output: + pos_emb[t], then `proj`
                              (D_enc -> D_dec, only when the widths differ)
    proj_out                  LM head (untied by default; tied to embed_tokens when tie_word_embeddings)

Seams: the `layers.EncoderDecoder` contract, the same as Moonshine's, so one decoding loop drives either.

`memory` is the encoder output (before the decoder's adapter, like transformers'
`encoder_last_hidden_state`); the adapter runs inside `new_cache`/`decode`, once per utterance.

Where MLX and transformers 5.x differ (and transformers' oddities):
  * Without an `attention_mask`, transformers skips the per-layer masks entirely, so the encoder
    attends over the *whole* utterance instead of its sliding windows; with a mask (even all ones)
    the windows apply. MLX always applies the windows (the streaming model is trained with them).
    Parity with transformers therefore holds when transformers is given a mask.
  * transformers downsamples the frame mask through the causal convs by "any valid input in the
    kernel window", which marks up to three extra frames past the clip's true conv output as valid
    (e.g. 34 instead of 31; they see zero padding), so a padded clip gets memory frames it would not
    have alone and its logits change (by ~1e-2 on random weights).
    MLX computes the valid frame count exactly (`frame_lengths`), so a padded batch equals each clip
    run alone.
  * Samples are framed by `floor(length / 80)`: a trailing partial frame is dropped when a mask is
    given, and transformers cannot reshape unmasked audio whose length is not a multiple of 80.
    MLX drops the partial frame in both cases.
  * The decoder adds `pos_emb` to `encoder_hidden_states` in place (`+=`), mutating the encoder
    output it was handed: every decoder call with the same `encoder_outputs` adds it again. Cached
    `generate` is unaffected (cross K/V are computed on the first step only), but uncached generation
    or reused `encoder_outputs` drift, and the returned `encoder_last_hidden_state` includes pos_emb.
  * `MoonshineStreamingConfig` declares no `num_key_value_heads`, yet the decoder reads it (its
    config.json must carry the key), and the decoder reshapes queries with the key/value head count,
    so GQA decoders crash. MLX defaults it to the attention heads and handles GQA.
  * `decoder_start_token_id` defaults to None (label shifting then fails); MLX falls back to
    `bos_token_id`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import ModelError
from .args import ArgsBase, rope_parameters
from .layers import Decoder, EncoderDecoder, EncoderMLP
from .moonshine import ModelArgs

CONV_KERNEL, CONV_STRIDE = 5, 2  # both causal convs of the embedder


@dataclass
class StreamingEncoderArgs(ArgsBase):
    """The nested `encoder_config` of a Moonshine Streaming `config.json`."""

    hidden_size: int = 320
    intermediate_size: int = 1280
    hidden_act: str = "gelu"
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    attention_bias: bool = False
    sample_rate: int = 16000
    frame_ms: float = 5.0  # 80 samples per frontend frame at 16 kHz
    # Per layer (left, right): keys from left - 1 frames back to right - 1 ahead; (16, 4) looks
    # 3 frames (60 ms) ahead, (16, 0) is causal.
    sliding_windows: list = field(
        default_factory=lambda: [[16, 4], [16, 4], [16, 0], [16, 0], [16, 4], [16, 4]])
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys, kept for to_dict()

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.sliding_windows = [tuple(int(v) for v in w) for w in self.sliding_windows]
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise ValueError(f"sliding_windows has {len(self.sliding_windows)} entries for "
                             f"{self.num_hidden_layers} encoder layers; give one (left, right) per layer")

    @property
    def frame_len(self) -> int:
        return int(round(self.sample_rate * self.frame_ms / 1000.0))

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["sliding_windows"] = [list(w) for w in self.sliding_windows]
        out["model_type"] = "moonshine_streaming_encoder"
        return out


@dataclass
class StreamingArgs(ArgsBase):
    """Configuration read from a Moonshine Streaming `config.json`; unknown keys are ignored."""

    encoder_config: StreamingEncoderArgs = field(default_factory=StreamingEncoderArgs)
    vocab_size: int = 32768
    hidden_size: int = 320  # decoder width; the encoder's may differ (adapter `proj` bridges them)
    intermediate_size: int = 1280
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096  # rows of pos_emb: at most 4096 encoder frames (~82 s)
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.8
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: Optional[int] = None  # None in transformers' defaults: use bos_token_id
    model_type: str = "moonshine_streaming"
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if isinstance(self.encoder_config, dict):
            self.encoder_config = StreamingEncoderArgs.from_dict(self.encoder_config)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0]
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.bos_token_id
        if self.head_dim not in (None, self.hidden_size // self.num_attention_heads):
            raise ValueError(f"decoder head_dim {self.head_dim} != hidden_size // num_attention_heads "
                             f"({self.hidden_size // self.num_attention_heads}) is not supported")

    def to_dict(self) -> dict:
        """A `config.json` that `MoonshineStreamingConfig` loads back (unknown keys from the source kept).

        `num_key_value_heads` is always written (transformers' decoder reads it without declaring
        it) and `decoder_start_token_id` is concrete (transformers' None breaks label shifting).
        """
        out = super().to_dict()
        out["encoder_config"] = self.encoder_config.to_dict()
        if out["head_dim"] is None:
            out["head_dim"] = self.hidden_size // self.num_attention_heads
        # transformers 5 keeps rotary settings only in rope_parameters.
        out["rope_parameters"] = rope_parameters(out.pop("rope_theta"), out.pop("partial_rotary_factor"))
        out.setdefault("architectures", ["MoonshineStreamingForConditionalGeneration"])
        out["is_encoder_decoder"] = True
        return out

    def decoder_args(self) -> ModelArgs:
        """The base model's ModelArgs describing this decoder (reused as is)."""
        return ModelArgs(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, decoder_num_hidden_layers=self.num_hidden_layers,
            decoder_num_attention_heads=self.num_attention_heads,
            decoder_num_key_value_heads=self.num_key_value_heads, decoder_hidden_act=self.hidden_act,
            rope_theta=self.rope_theta, partial_rotary_factor=self.partial_rotary_factor,
            attention_bias=self.attention_bias, tie_word_embeddings=self.tie_word_embeddings,
        )


def frame_lengths(num_samples: mx.array, frame_len: int = 80) -> mx.array:
    """Valid encoder frames for clips of `num_samples` samples: floor to whole frontend frames, then
    each causal stride-2 conv keeps ceil(n / 2) (its left padding makes outputs = ceil(inputs / 2))."""
    n = num_samples // frame_len
    for _ in range(2):
        n = (n + 1) // 2
    return n


class UnitOffsetLayerNorm(nn.Module):
    """LayerNorm without bias whose scale is stored as `gamma` = scale - 1 (zero at init)."""

    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.gamma = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.layer_norm(x, 1.0 + self.gamma, None, self.eps)


class AsinhCompression(nn.Module):
    """asinh(k * x) with a learned log k: log-like dynamic range compression, linear near zero."""

    def __init__(self, k_init: float = 0.75):
        super().__init__()
        self.log_k = mx.log(mx.array(k_init))  # a scalar (shape ()), as in the checkpoint

    def __call__(self, x: mx.array) -> mx.array:
        return mx.arcsinh(mx.exp(self.log_k).astype(x.dtype) * x)


class CausalConv1d(nn.Conv1d):
    """Conv1d left-padded by kernel - 1, so output t sees inputs up to stride * t only."""

    def __call__(self, x: mx.array) -> mx.array:
        # x: (B, T, C_in) -> (B, ceil(T / stride), C_out)
        left = self.weight.shape[1] - 1
        return super().__call__(mx.pad(x, [(0, 0), (left, 0), (0, 0)]))


def _frame_valid(n: mx.array, T: int) -> mx.array:
    return mx.arange(T)[None, :] < n[:, None]  # (B, T) bool


class Embedder(nn.Module):
    def __init__(self, args: StreamingEncoderArgs):
        super().__init__()
        D = args.hidden_size
        self.frame_len = args.frame_len
        self.comp = AsinhCompression()
        self.linear = nn.Linear(self.frame_len, D, bias=False)
        self.conv1 = CausalConv1d(D, 2 * D, CONV_KERNEL, stride=CONV_STRIDE)
        self.conv2 = CausalConv1d(2 * D, D, CONV_KERNEL, stride=CONV_STRIDE)

    def __call__(self, input_values: mx.array, lengths: Optional[mx.array]):
        """(B, N) samples (N a multiple of frame_len), (B,) valid samples or None
        -> ((B, T, D), (B, T) bool or None)."""
        B = input_values.shape[0]
        x = input_values.reshape(B, -1, self.frame_len)  # (B, F, 80): 5 ms frames
        # Per-frame CMVN in float32: a frame's statistics never mix with its neighbours' (or padding).
        xf = x.astype(mx.float32)
        xf = xf - xf.mean(axis=-1, keepdims=True)
        xf = xf * mx.rsqrt(mx.square(xf).mean(axis=-1, keepdims=True) + 1e-6)
        x = nn.silu(self.linear(self.comp(xf.astype(self.linear.weight.dtype))))  # (B, F, D)
        if lengths is None:
            x = nn.silu(self.conv1(x))
            return self.conv2(x), None
        # Zero padded frames before each causal conv, so no valid output ever sees them; the valid
        # counts shrink exactly as the conv arithmetic does (ceil(n / 2) per conv).
        n = lengths // self.frame_len
        for i, conv in enumerate((self.conv1, self.conv2)):
            x = x * _frame_valid(n, x.shape[1])[..., None].astype(x.dtype)
            x = conv(x)
            n = (n + 1) // 2
            if i == 0:
                x = nn.silu(x)
        valid = _frame_valid(n, x.shape[1])
        return x * valid[..., None].astype(x.dtype), valid


class EncoderAttention(nn.Module):
    def __init__(self, args: StreamingEncoderArgs):
        super().__init__()
        D, bias = args.hidden_size, args.attention_bias
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=bias)

    def __call__(self, x: mx.array, mask: Optional[mx.array]) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, heads, L, hd)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class EncoderLayer(nn.Module):
    def __init__(self, args: StreamingEncoderArgs):
        super().__init__()
        self.self_attn = EncoderAttention(args)
        self.mlp = EncoderMLP(args.hidden_size, args.intermediate_size, args.hidden_act)
        self.input_layernorm = UnitOffsetLayerNorm(args.hidden_size)
        self.post_attention_layernorm = UnitOffsetLayerNorm(args.hidden_size)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def window_mask(T: int, window: tuple, valid: Optional[mx.array], dtype) -> mx.array:
    """Additive attention mask: query q sees key k iff 0 <= q - k < left or 0 < k - q < right,
    and k is a valid frame. Shape (T, T), or (B, 1, T, T) with `valid` (B, T)."""
    left, right = window
    dist = mx.arange(T)[:, None] - mx.arange(T)[None, :]  # q - k
    allowed = ((dist >= 0) & (dist < left)) | ((dist < 0) & (-dist < right))
    if valid is not None:
        allowed = allowed[None, None] & valid[:, None, None, :]
    # Finite, so padded queries with no visible key average harmlessly instead of turning into NaN.
    neg = mx.array(-1e9 if dtype == mx.float32 else -3e4, dtype=dtype)
    return mx.where(allowed, mx.array(0.0, dtype=dtype), neg)


class StreamingEncoder(nn.Module):
    def __init__(self, args: StreamingEncoderArgs):
        super().__init__()
        self.sliding_windows = args.sliding_windows
        self.frame_len = args.frame_len
        self.embedder = Embedder(args)
        self.layers = [EncoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.final_norm = UnitOffsetLayerNorm(args.hidden_size)

    def __call__(self, input_values: mx.array, lengths: Optional[mx.array] = None):
        """(B, N) samples, (B,) valid sample counts or None -> ((B, T, D), (B, T) bool or None)."""
        N = input_values.shape[1]
        usable = N - N % self.frame_len
        if usable != N:  # a trailing partial 5 ms frame is dropped (transformers floors too)
            input_values = input_values[:, :usable]
            lengths = None if lengths is None else mx.minimum(lengths, usable)
        x, valid = self.embedder(input_values, lengths)
        T = x.shape[1]
        masks = {w: window_mask(T, w, valid, x.dtype) for w in set(self.sliding_windows)}
        for layer, w in zip(self.layers, self.sliding_windows):
            x = layer(x, masks[w])
        return self.final_norm(x), valid


class StreamingDecoder(Decoder):
    """The base Moonshine decoder plus the adapter that gives the position-free encoder output its
    positions (`pos_emb`) and width (`proj`) before cross-attention."""

    def __init__(self, args: StreamingArgs):
        super().__init__(args.decoder_args())
        enc_dims = args.encoder_config.hidden_size
        self.pos_emb = nn.Embedding(args.max_position_embeddings, enc_dims)
        if enc_dims != args.hidden_size:
            self.proj = nn.Linear(enc_dims, args.hidden_size, bias=False)

    def adapt(self, memory: mx.array) -> mx.array:
        """Encoder output (B, T, D_enc) -> cross-attention input (B, T, D_dec)."""
        T, max_T = memory.shape[1], self.pos_emb.weight.shape[0]
        if T > max_T:
            raise ModelError(f"audio of {T} encoder frames exceeds the model's {max_T} positions "
                             f"(~{max_T * 0.02:.0f} s); split it into shorter clips")
        memory = memory + self.pos_emb.weight[:T].astype(memory.dtype)
        return self.proj(memory) if "proj" in self else memory

    def cross_kv(self, memory: mx.array) -> list:
        return super().cross_kv(self.adapt(memory))


class StreamingInner(nn.Module):
    def __init__(self, args: StreamingArgs):
        super().__init__()
        self.encoder = StreamingEncoder(args.encoder_config)
        self.decoder = StreamingDecoder(args)


class StreamingModel(EncoderDecoder):
    """`MoonshineStreamingForConditionalGeneration` in MLX."""

    CONV_PREFIX = "model.encoder.embedder.conv"

    def __init__(self, args: StreamingArgs):
        super().__init__(args, StreamingInner(args))

    # -- seams ------------------------------------------------------------------------------------
    def encode(self, input_values: mx.array, lengths: Optional[mx.array] = None):
        """Audio -> encoder memory.

        Args:
            input_values: (B, N) float samples at 16 kHz.
            lengths: (B,) valid sample counts (a (B, N) sample mask is read as its row sums), or None
                when every sample is real.

        Returns:
            (memory (B, T, D_enc), memory_mask (B, T) bool or None); T = floor(N / 80) halved twice
            (rounding up), one frame per 20 ms.
        """
        if lengths is not None and lengths.ndim == 2:
            lengths = lengths.astype(mx.int32).sum(axis=-1)
        return self.model.encoder(input_values, lengths)
