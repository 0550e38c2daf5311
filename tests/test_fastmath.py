"""The CPU fast kernels equal MLX's exact ops, forward and backward (their custom VJPs)."""

import numpy as np
import pytest

import mlx_moonshine  # noqa: F401
import mlx.core as mx
import mlx.nn as nn

from mlx_moonshine.models import fastmath

OPS = {
    "gelu": (fastmath.gelu, nn.gelu),
    "softmax": (fastmath.softmax, lambda z: mx.softmax(z, axis=-1)),
    "tanh": (fastmath.tanh, mx.tanh),
}


@pytest.mark.parametrize("name", list(OPS))
def test_forward_and_gradient_match_exact_ops(name):
    fast, exact = OPS[name]
    x = mx.random.normal((3, 5, 40), key=mx.random.key(1)) * 4
    w = mx.random.normal(x.shape, key=mx.random.key(2))
    np.testing.assert_allclose(np.array(fast(x)), np.array(exact(x)), atol=2e-6)
    g_fast = mx.grad(lambda z: (fast(z) * w).sum())(x)
    g_exact = mx.grad(lambda z: (exact(z) * w).sum())(x)
    np.testing.assert_allclose(np.array(g_fast), np.array(g_exact), atol=1e-5)


def test_extreme_inputs_stay_finite():
    x = mx.array([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4])
    for fast, exact in OPS.values():
        out = np.array(fast(x))
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, np.array(exact(x)), atol=1e-5)
