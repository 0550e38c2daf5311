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


@pytest.mark.parametrize("K,N,blocked", [(416, 32768, True), (416, 3328, True), (288, 2304, False), (300, 7001, False)])
def test_one_and_two_row_products_of_big_weights_go_block_by_block(K, N, blocked):
    """Past OpenBLAS's small-matrix size a one-row product packs the whole weight first: big weights are cut
    into column blocks for one or two rows, the same product up to float rounding; more rows, small weights,
    widths no block divides, and MLX's exact ops (Metal) keep the plain product."""
    w_t = mx.random.normal((K, N), key=mx.random.key(K + N)) / K ** 0.5
    for rows in (1, 2, 3):
        t = fastmath.TransposedCopy()
        t.weight_t = w_t
        x = mx.random.normal((rows, 1, K), key=mx.random.key(rows))
        y = fastmath.rows_product(x, t)
        assert y.shape == (rows, 1, N)
        assert (t.blocks is not None) == (blocked and rows <= 2)
        np.testing.assert_allclose(np.array(y), np.array(x @ w_t), rtol=1e-5, atol=1e-5)
        with fastmath.exact_ops():
            plain = fastmath.TransposedCopy()
            plain.weight_t = w_t
            assert np.array_equal(np.array(fastmath.rows_product(x, plain)), np.array(x @ w_t))
            assert plain.blocks is None
