"""LoRA adapter layer that wraps a base `nn.Linear` (or `nn.QuantizedLinear`).

    y = base(x) + scale * (dropout(x) @ lora_A.T) @ lora_B.T

with `lora_A` [r, in] and `lora_B` [out, r] in PEFT's layout, so exporting a PEFT adapter is a
plain copy. `scale` is PEFT's: alpha / r, or alpha / sqrt(r) with rsLoRA. `lora_B` starts at zero,
so a fresh layer equals its base exactly.

Adapter weights are always float32, whatever the base dtype: the input is cast up for the low-rank
path and the sum cast back to the base's output dtype (PEFT does the same).

Initialisations (PEFT's `init_lora_weights`):
  * "default": A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a=sqrt(5)), B = 0.
  * "pissa" / "pissa_niter_N": A, B from the top-r singular triplets of W (full SVD, or randomized
    SVD with N subspace iterations), the base replaced by the residual W - scale * B @ A. Copies of
    the initial A0, B0 are kept (frozen) so the result can be exported as a plain LoRA against the
    original base: rank 2r, A' = [A; A0], B' = [B, -B0] (`lora_against_original_base`).

Flat-LoRA (off by default): with `perturb_sigma > 0` and the layer in training mode, every call adds
x @ eps.T, with eps ~ N(0, (sigma * ||W'_i|| / sqrt(in))^2) drawn afresh for each output row i of
the merged weight W' = W + scale * B @ A. It is a random weight perturbation that pushes training
toward flat minima of the full weight; it is never applied in eval mode and `fuse()` ignores it.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models.fastmath import linear as base_linear

INITS = ("default", "pissa")  # plus "pissa_niter_N"


def check_init(init: str) -> str:
    """Return `init` if it names a supported initialisation, else raise ValueError."""
    if init in INITS:
        return init
    prefix = "pissa_niter_"
    if init.startswith(prefix) and init[len(prefix):].isdigit():
        return init
    raise ValueError(f"unknown adapter init {init!r}; use 'default', 'pissa' or 'pissa_niter_N' (N >= 0)")


def dense_weight(linear: nn.Module) -> mx.array:
    """The base layer's weight [out, in] as a dense array (dequantized for `nn.QuantizedLinear`)."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear.weight, linear.scales, linear.get("biases"), linear.group_size,
                             linear.bits, mode=getattr(linear, "mode", "affine"))
    return linear.weight


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's `scaling`: alpha / sqrt(r) with rsLoRA, alpha / r otherwise."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _top_r_svd(W: np.ndarray, r: int, niter: Optional[int], seed: int):
    """(U_r [out, r], S_r [r], Vh_r [r, in]) of W, full SVD or randomized with `niter` iterations."""
    if niter is None:
        U, S, Vh = np.linalg.svd(W, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    # Randomized range finder (Halko et al., as torch.svd_lowrank with q=r): power iterations
    # re-orthonormalised each step to keep the small singular directions from underflowing.
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(W @ rng.standard_normal((W.shape[1], r)))
    for _ in range(niter):
        Q, _ = np.linalg.qr(W.T @ Q)
        Q, _ = np.linalg.qr(W @ Q)
    Ub, S, Vh = np.linalg.svd(Q.T @ W, full_matrices=False)
    return Q @ Ub, S, Vh


def flat_noise(x: mx.array, row_norm: mx.array, sigma: float) -> mx.array:
    """Flat-LoRA term x @ eps.T with eps[i] ~ N(0, (sigma * row_norm[i] / sqrt(in))^2), no gradient."""
    out_dims, in_dims = row_norm.shape[0], x.shape[-1]
    std = mx.stop_gradient(row_norm) * (sigma / math.sqrt(in_dims))
    eps = mx.random.normal((out_dims, in_dims)) * std[:, None]
    return x @ eps.T


class LoRALinear(nn.Module):
    """A base linear layer plus a trainable low-rank update (see the module docstring)."""

    @staticmethod
    def from_base(linear: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                  use_rslora: bool = False, init: str = "default", perturb_sigma: float = 0.0,
                  key: Optional[mx.array] = None, seed: int = 0) -> "LoRALinear":
        """Wrap `linear` (left in place, frozen) in a LoRA layer.

        Args:
            linear: The `nn.Linear` or `nn.QuantizedLinear` to adapt.
            r: Rank of the update.
            alpha: PEFT's `lora_alpha`; the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).
            dropout: Dropout probability on the low-rank path's input (training mode only).
            use_rslora: Use rank-stabilised scaling alpha / sqrt(r).
            init: "default", "pissa" or "pissa_niter_N".
            perturb_sigma: Flat-LoRA noise level; 0 disables it.
            key: PRNG key for the default init of `lora_A` (None: the global MLX generator).
            seed: Seed of the randomized SVD for "pissa_niter_N".

        Returns:
            The new layer; only `lora_A` and `lora_B` are trainable.
        """
        layer = LoRALinear(linear, r, alpha, dropout, use_rslora, perturb_sigma)
        layer.initialize(init, key=key, seed=seed)
        return layer

    def __init__(self, linear: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False, perturb_sigma: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        out_dims, in_dims = dense_weight(linear).shape
        self.linear = linear
        self.linear.freeze()
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scale = lora_scale(r, alpha, use_rslora)
        self.dropout_p = dropout
        self.dropout = nn.Dropout(p=dropout)
        self.perturb_sigma = perturb_sigma
        self.init = "default"
        self.lora_A = mx.zeros((r, in_dims), dtype=mx.float32)
        self.lora_B = mx.zeros((out_dims, r), dtype=mx.float32)

    @property
    def is_pissa(self) -> bool:
        return "pissa_A0" in self

    def initialize(self, init: str = "default", key: Optional[mx.array] = None, seed: int = 0) -> None:
        """(Re)initialise A and B; PiSSA also rewrites the base weight to the residual."""
        init = check_init(init)
        if init == "default":
            in_dims = self.lora_A.shape[1]
            bound = 1.0 / math.sqrt(in_dims)  # kaiming_uniform(a=sqrt(5)) on a [r, in] weight
            self.lora_A = mx.random.uniform(-bound, bound, self.lora_A.shape, dtype=mx.float32, key=key)
            self.lora_B = mx.zeros_like(self.lora_B)
            return
        if self.is_pissa:
            raise ValueError("this layer already holds a PiSSA init; wrap the original base layer instead")
        niter = None if init == "pissa" else int(init.split("_niter_")[1])
        W = np.array(dense_weight(self.linear).astype(mx.float32), dtype=np.float64)
        U, S, Vh = _top_r_svd(W, self.r, niter, seed)
        # PEFT's convention: S_r / scale split evenly, so that scale * B @ A = U_r S_r Vh_r.
        root = np.sqrt(S / self.scale)
        A0 = mx.array((root[:, None] * Vh).astype(np.float32))  # [r, in]
        B0 = mx.array((U * root[None, :]).astype(np.float32))  # [out, r]
        self.set_pissa(A0, B0)
        self.init = init

    def set_pissa(self, A0: mx.array, B0: mx.array) -> None:
        """Adopt a PiSSA start (A0, B0): A, B = A0, B0 and base weight W -> W - scale * B0 @ A0.

        Used by `initialize` and by adapter loading (which restores A0, B0 rather than redoing the SVD).
        """
        if isinstance(self.linear, nn.QuantizedLinear):
            raise ValueError("PiSSA needs a float base layer; initialise before quantizing the residual")
        A0, B0 = A0.astype(mx.float32), B0.astype(mx.float32)
        if A0.shape != self.lora_A.shape or B0.shape != self.lora_B.shape:
            raise ValueError(f"PiSSA A0/B0 shapes {A0.shape}/{B0.shape} do not fit this layer "
                             f"({self.lora_A.shape}/{self.lora_B.shape})")
        W = self.linear.weight
        self.linear.weight = (W.astype(mx.float32) - self.scale * (B0 @ A0)).astype(W.dtype)
        self.lora_A, self.lora_B = A0, B0
        self.pissa_A0, self.pissa_B0 = mx.array(A0), mx.array(B0)
        self.freeze(keys=["pissa_A0", "pissa_B0"], recurse=False)

    def delta_weight(self) -> mx.array:
        """scale * B @ A, float32 [out, in]."""
        return self.scale * (self.lora_B @ self.lora_A)

    def lora_against_original_base(self) -> tuple[mx.array, mx.array, float]:
        """(A [r', in], B [out, r'], alpha') of a plain LoRA that gives the same layer on the *original* base.

        For PiSSA: rank 2r with A' = [A; A0], B' = [B, -B0] and alpha doubled (times sqrt(2) with
        rsLoRA), so scale' = scale, exactly like PEFT's `path_initial_model_for_weight_conversion`.
        Otherwise (A, B, alpha) unchanged.
        """
        if not self.is_pissa:
            return self.lora_A, self.lora_B, self.alpha
        A = mx.concatenate([self.lora_A, self.pissa_A0], axis=0)
        B = mx.concatenate([self.lora_B, -self.pissa_B0], axis=1)
        return A, B, self.alpha * (math.sqrt(2.0) if self.use_rslora else 2.0)

    def _lora(self, x32: mx.array) -> mx.array:
        return (x32 @ self.lora_A.T) @ self.lora_B.T

    def _perturbing(self) -> bool:
        # A Python-level check: a compiled training step bakes in `perturb_sigma`, so a sigma schedule
        # must recompile (or run uncompiled) when it changes the value.
        return self.training and self.perturb_sigma > 0

    def __call__(self, x: mx.array) -> mx.array:
        y = base_linear(self.linear, x)  # the very call the unwrapped model makes: identity at init, bit for bit
        x32 = x.astype(mx.float32)
        out = y + self.scale * self._lora(self.dropout(x32))
        if self._perturbing():
            merged = dense_weight(self.linear).astype(mx.float32) + self.delta_weight()
            out = out + flat_noise(x32, mx.linalg.norm(merged, axis=1), self.perturb_sigma)
        return out.astype(y.dtype)

    def fused_weight(self) -> mx.array:
        """The merged weight W + scale * B @ A, float32 [out, in]."""
        return dense_weight(self.linear).astype(mx.float32) + self.delta_weight()

    def fuse(self, de_quantize: bool = False) -> nn.Module:
        """A plain layer equal to this one: `nn.Linear` (re-quantized if the base was quantized,
        unless `de_quantize`), in the base weight's dtype, bias kept."""
        return _to_linear(self.linear, self.fused_weight(), de_quantize)


def _to_linear(base: nn.Module, weight: mx.array, de_quantize: bool) -> nn.Module:
    """A new layer with `weight` (float32 [out, in]) and the bias of `base`, in the base's dtype."""
    dtype = base.scales.dtype if isinstance(base, nn.QuantizedLinear) else base.weight.dtype
    out_dims, in_dims = weight.shape
    bias = base.get("bias")
    fused = nn.Linear(in_dims, out_dims, bias=bias is not None)
    fused.weight = weight.astype(dtype)
    if bias is not None:
        fused.bias = bias
    if isinstance(base, nn.QuantizedLinear) and not de_quantize:
        return nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits,
                                              mode=getattr(base, "mode", "affine"))
    return fused
