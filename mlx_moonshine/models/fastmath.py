"""Fast element-wise GELU and softmax for MLX's CPU backend.

On Linux/x86 MLX evaluates erf/exp/tanh one scalar at a time (~20-60 ns per float), so the encoder's
GELUs and attention softmaxes cost more than all its matmuls. Written as polynomials of mul/add and
compiled, the same functions become one fused, vectorised loop (~40x faster for GELU, ~3x for the
softmax). Accuracy: |GELU error| < 2e-6, softmax relative error < 2e-7. On Metal the built-in ops
are already fast, so callers use these only on the CPU (`use_fast_cpu_ops`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

_ENABLED = os.environ.get("MLX_MOONSHINE_EXACT_OPS", "") in ("", "0")

# Abramowitz & Stegun 7.1.28: erf(x) = 1 - (1 + a1 x + ... + a6 x^6)^-16 for x >= 0, |error| <= 3e-7.
_ERF_A = (0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638)
_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_LOG2E = 1.4426950408889634
# ln 2 split in two so that n * LN2_HI is exact in float32 (Cody-Waite range reduction).
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187e-06
_ROUND, _ROUND_BITS = 12582912.0, 0x4B400000  # 1.5 * 2^23 and its float32 bit pattern


_CACHE_ENV = "MLX_MOONSHINE_CPU_CACHE_MB"
_CACHE_MB = 1024  # inference: a 28 s encoder pass recycles ~1 GB of temporaries
_TRAIN_CACHE_MB = 256  # training: same step time, ~0.7 GB less resident memory


def configure_cpu_cache() -> None:
    """Let MLX's CPU allocator keep up to 1 GiB of freed buffers (MLX_MOONSHINE_CPU_CACHE_MB to change).

    With the CPU backend's 32 MiB default, every large temporary goes back to the OS and the next one
    page-faults fresh memory: after a decoding loop the 10 s encoder pass ran 1.5x slower (0.46 s vs 0.31 s),
    and with 256 MiB the 28 s one still did (3.1-3.6 s vs 1.9 s). Never lowers a limit someone else has set.
    """
    if mx.default_device().type != mx.DeviceType.cpu:
        return
    want = _cache_bytes(_CACHE_MB)
    if want is not None:
        previous = mx.set_cache_limit(want)
        if previous > want:
            mx.set_cache_limit(previous)


def training_cpu_cache() -> "int | None":
    """Lower the CPU cache to 256 MiB for a training loop; returns the limit to restore afterwards (or None).

    A training step at batch 2 runs as fast with 256 MiB as with 1 GiB (1.22 vs 1.21 s here) while its peak
    RSS drops from 1.64 to 0.93 GB. An explicit MLX_MOONSHINE_CPU_CACHE_MB is left alone.
    """
    if mx.default_device().type != mx.DeviceType.cpu or _CACHE_ENV in os.environ:
        return None
    return mx.set_cache_limit(_TRAIN_CACHE_MB * 2**20)


def _cache_bytes(default_mb: float) -> "int | None":
    try:
        return int(float(os.environ.get(_CACHE_ENV, default_mb)) * 2**20)
    except ValueError:
        return None


def use_fast_cpu_ops() -> bool:
    """True on the CPU backend unless MLX_MOONSHINE_EXACT_OPS=1 (or `exact_ops()`) asks for MLX's own ops."""
    return _ENABLED and mx.default_device().type == mx.DeviceType.cpu


@contextmanager
def exact_ops(on: bool = True):
    """Within the block, MLX's own ops everywhere (what Metal runs): `MLX_MOONSHINE_EXACT_OPS=1` in process.

    Compiled steps bake in the choice: build them inside the block (decoding rebuilds its own).
    """
    global _ENABLED
    before, _ENABLED = _ENABLED, not on
    try:
        yield
    finally:
        _ENABLED = before


def _erf(x: mx.array) -> mx.array:
    a = mx.abs(x)
    a1, a2, a3, a4, a5, a6 = _ERF_A
    p = 1 + a * (a1 + a * (a2 + a * (a3 + a * (a4 + a * (a5 + a * a6)))))
    p = p * p
    p = p * p
    p = p * p
    p = p * p  # p^16
    return mx.where(x < 0, -1.0, 1.0) * (1 - 1 / p)


def _gelu(x: mx.array) -> mx.array:
    return (0.5 * x * (1 + _erf(x * _SQRT1_2))).astype(x.dtype)


def _exp(x: mx.array) -> mx.array:
    """exp(x) = 2^n * exp(f), |f| <= ln2/2, exp(f) by its Taylor series (relative error < 1e-7).

    n = round(x / ln 2) by the 1.5 * 2^23 trick: adding it leaves n in the low mantissa bits (floor()
    would be a libm call per value in MLX's CPU kernels), and those bits shifted into the exponent
    field give 2^n without a pow.
    """
    x = mx.clip(x.astype(mx.float32), -87.0, 88.0)
    t = mx.stop_gradient(x * _LOG2E + _ROUND)
    n = t - _ROUND
    f = x - n * _LN2_HI - n * _LN2_LO
    p = 1 + f * (1 + f * (1 / 2 + f * (1 / 6 + f * (1 / 24 + f * (1 / 120 + f * (1 / 720 + f / 5040))))))
    two_n = mx.stop_gradient(mx.view(mx.left_shift(mx.view(t, mx.int32) - (_ROUND_BITS - 127), 23), mx.float32))
    return p * two_n


def _softmax(x: mx.array) -> mx.array:
    e = _exp(x - mx.stop_gradient(mx.max(x, axis=-1, keepdims=True)))
    return (e / mx.sum(e, axis=-1, keepdims=True)).astype(x.dtype)


def _tanh(x: mx.array) -> mx.array:
    return (1 - 2 / (_exp(2 * x.astype(mx.float32)) + 1)).astype(x.dtype)


def _gelu_grad(x: mx.array, dy: mx.array) -> mx.array:
    """d/dx [x * Phi(x)] = Phi(x) + x * phi(x)."""
    xf = x.astype(mx.float32)
    cdf = 0.5 * (1 + _erf(xf * _SQRT1_2))
    pdf = _exp(-0.5 * xf * xf) * _INV_SQRT_2PI
    return (dy * (cdf + xf * pdf)).astype(x.dtype)


def _softmax_grad(y: mx.array, dy: mx.array) -> mx.array:
    return y * (dy - mx.sum(dy * y, axis=-1, keepdims=True))


def _tanh_grad(y: mx.array, dy: mx.array) -> mx.array:
    return dy * (1 - y * y)


# Each op gets its closed-form gradient: left to autodiff, the backward pass would keep every
# intermediate of the polynomials alive (~20 arrays the size of the attention scores per layer).
_gelu_c, _gelu_grad_c = mx.compile(_gelu), mx.compile(_gelu_grad)
_softmax_c, _softmax_grad_c = mx.compile(_softmax), mx.compile(_softmax_grad)
_tanh_c, _tanh_grad_c = mx.compile(_tanh), mx.compile(_tanh_grad)


@mx.custom_function
def gelu(x: mx.array) -> mx.array:
    return _gelu_c(x)


@gelu.vjp
def _gelu_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (list, tuple)) else primals  # a lone input comes bare
    return (_gelu_grad_c(x, cotangent),)


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    return _softmax_c(x)


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return (_softmax_grad_c(output, cotangent),)


@mx.custom_function
def tanh(x: mx.array) -> mx.array:
    return _tanh_c(x)


@tanh.vjp
def _tanh_vjp(primals, cotangent, output):
    return (_tanh_grad_c(output, cotangent),)


# OpenBLAS (x86) multiplies a product of up to ~1e6 multiply-adds with its small-matrix kernel; past that it
# first packs the whole weight into its own layout, on every call. For one decoding row that packing is most
# of the work (benchmarks/profile_cpu.py: sgemm_itcopy), so big weights are cut into column blocks under it.
_SMALL_GEMM = 1_000_000
_BLOCKS = (1024, 512, 256)  # columns per block: the widest that divides N and keeps K x block under _SMALL_GEMM
_BLOCK_ROWS = 2  # up to this many rows the blocks win (5.4 vs 9 ms for base's head at one row here)


def _block_width(K: int, N: int) -> int:
    """Columns per block for a (K, N) weight, or 0: small enough as it is, or no width fits."""
    if K * N <= _SMALL_GEMM:
        return 0
    return next((c for c in _BLOCKS if N % c == 0 and K * c <= _SMALL_GEMM), 0)


class TransposedCopy:
    """A contiguous W^T kept beside an nn.Linear (a plain object: not a parameter, never saved), and for
    big weights the same columns as blocks (N / c, K, c) for one- or two-row products."""

    source = None
    weight_t = None
    blocks = None


def rows_product(x: mx.array, t: TransposedCopy) -> mx.array:
    """`x @ t.weight_t`; for one or two rows of a big weight on the CPU, one batched product of small blocks.

    The blocks are built on first use, from the weights alone (no traced input), so a first use inside a
    compiled step works too (rows leaving a decoding batch; tested on real weights).
    """
    K, N = t.weight_t.shape
    c = _block_width(K, N)
    if x.size > _BLOCK_ROWS * K or not c or not use_fast_cpu_ops():
        return x @ t.weight_t
    if t.blocks is None:
        t.blocks = mx.contiguous(t.weight_t.reshape(K, N // c, c).transpose(1, 0, 2))
    y = x.reshape(-1, K) @ t.blocks  # (N / c, rows, c)
    return y.transpose(1, 0, 2).reshape(*x.shape[:-1], N)


def linear(layer: nn.Module, x: mx.array) -> mx.array:
    """`layer(x)`; for a few rows at inference on the CPU, through a cached contiguous W^T.

    Decoding multiplies one row per utterance by every weight; OpenBLAS does that ~25% faster with W^T
    laid out contiguously than with the strided W.T. Training takes the plain path; the copy is rebuilt
    whenever the weight array changes (load, fuse, cast). Adapter layers compute their base product
    through this same function, so a fresh adapter (B = 0) gives bit-identical outputs on every BLAS:
    the two paths round differently, so wrapping must never switch between them.
    """
    if type(layer) is not nn.Linear or layer.training or x.size > 16 * x.shape[-1] \
            or not use_fast_cpu_ops():
        return layer(x)
    t = getattr(layer, "_transposed", None)
    if t is None or t.source is not layer.weight:
        t = TransposedCopy()
        t.source, t.weight_t = layer.weight, mx.contiguous(layer.weight.T)
        layer._transposed = t
    y = rows_product(x, t)
    return y + layer.bias if "bias" in layer else y
