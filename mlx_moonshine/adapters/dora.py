"""DoRA: weight-decomposed low-rank adaptation, with PEFT's exact math (peft/tuners/lora/dora.py).

The adapted weight is m * V / ||V||_row with V = W + scale * B @ A and a trainable magnitude m [out],
initialised to ||W + scale * B @ A||_row (= ||W||_row at init, as B = 0), so a fresh layer equals
its base. As in the paper (sec. 4.3) and PEFT, the norm is treated as a constant: no gradient flows
through it.

PEFT computes the output as a correction on top of the base output, and so do we:
    no dropout / eval:  y = base(x) + (s - 1) * (base(x) - bias) + s * scale * lora(x)
    dropout, training:  y = base(x) + (s - 1) * (x' @ W.T)       + s * scale * lora(x'),  x' = dropout(x)
with s = m / ||V||_row. (With dropout the base path sees the clean x and only the correction sees x'.)
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .lora import LoRALinear, base_linear, dense_weight, flat_noise


class DoRALinear(LoRALinear):
    """A LoRA layer plus a per-output-row magnitude (see the module docstring)."""

    @staticmethod
    def from_base(linear: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                  use_rslora: bool = False, init: str = "default", perturb_sigma: float = 0.0,
                  key: Optional[mx.array] = None, seed: int = 0) -> "DoRALinear":
        """Wrap `linear` in a DoRA layer; arguments as `LoRALinear.from_base`.

        Returns:
            The new layer; `lora_A`, `lora_B` and `magnitude` are trainable.
        """
        layer = DoRALinear(linear, r, alpha, dropout, use_rslora, perturb_sigma)
        layer.initialize(init, key=key, seed=seed)
        return layer

    def __init__(self, linear: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False, perturb_sigma: float = 0.0):
        super().__init__(linear, r, alpha, dropout, use_rslora, perturb_sigma)
        self.magnitude = mx.zeros((self.lora_B.shape[0],), dtype=mx.float32)

    def initialize(self, init: str = "default", key: Optional[mx.array] = None, seed: int = 0) -> None:
        """LoRA init (PiSSA rewrites the base), then m = ||W + scale * B @ A||_row."""
        super().initialize(init, key=key, seed=seed)
        self.magnitude = self.weight_norm()

    def set_pissa(self, A0: mx.array, B0: mx.array) -> None:
        super().set_pissa(A0, B0)
        # W_res + scale * B0 @ A0 = W, so the magnitude is unchanged (up to rounding); refresh it anyway.
        self.magnitude = self.weight_norm()

    def weight_norm(self) -> mx.array:
        """||W + scale * B @ A|| over each output row, float32 [out], without gradient."""
        V = dense_weight(self.linear).astype(mx.float32) + self.delta_weight()
        return mx.stop_gradient(mx.linalg.norm(V, axis=1))

    def __call__(self, x: mx.array) -> mx.array:
        y = base_linear(self.linear, x)  # as the unwrapped model computes it (see LoRALinear.__call__)
        x32 = x.astype(mx.float32)
        s = self.magnitude / self.weight_norm()  # [out]
        if self.dropout_p > 0 and self.training:
            x_drop = self.dropout(x32)
            base = x_drop @ dense_weight(self.linear).astype(mx.float32).T
        else:
            x_drop = x32
            bias = self.linear.get("bias")
            base = y if bias is None else y - bias
        out = y + (s - 1) * base + s * (self.scale * self._lora(x_drop))
        if self._perturbing():
            # Rows of the merged weight s * V have norm |m|.
            out = out + flat_noise(x32, mx.abs(self.magnitude), self.perturb_sigma)
        return out.astype(y.dtype)

    def fused_weight(self) -> mx.array:
        """The merged weight m / ||V||_row * V with V = W + scale * B @ A, float32 [out, in]."""
        V = dense_weight(self.linear).astype(mx.float32) + self.delta_weight()
        return (self.magnitude / self.weight_norm())[:, None] * V
