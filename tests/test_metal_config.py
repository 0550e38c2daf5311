"""The configuration Mac users run (compiled training and decoding steps, MLX's own ops, no CPU-only
kernels), exercised on the CPU backend against the default CPU path: same losses, same transcripts."""

from __future__ import annotations

import numpy as np
import pytest

import mlx_moonshine  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx
import mlx.optimizers as optim

from mlx_moonshine.models import fastmath
from mlx_moonshine.adapters.apply import AdapterConfig, apply_adapters
from mlx_moonshine.data import load_manifest
from mlx_moonshine.decoding import DecodingOptions, decode_batch
from mlx_moonshine.loading import load
from mlx_moonshine.train.batches import load_clips, make_batch
from mlx_moonshine.train.step import Stepper, default_loss
from mlx_moonshine.train.config import TrainArgs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from conftest import write_tiny_corpus

    return load_manifest(write_tiny_corpus(tmp_path_factory.mktemp("metal"), "train", 8, seed=3)).samples


def _run(model_dir, samples, *, metal: bool):
    """Four training steps, then greedy transcripts; `metal`: compiled + bucketed + exact ops."""
    model, processor = load(model_dir)
    mx.random.seed(0)
    apply_adapters(model, AdapterConfig(kind="lora", r=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj"]))
    args = TrainArgs(batch_size=2, compile=metal, pad_seconds=0.5)
    model.train()
    stepper = Stepper(model, optim.AdamW(learning_rate=3e-3), default_loss, compile=metal)
    losses = [float(stepper([make_batch(samples[i:i + 2], processor, args)])[0]) for i in range(0, 8, 2)]
    model.eval()
    clips = load_clips(samples, processor)
    texts = [r.text for r in decode_batch(model, processor, clips, DecodingOptions(), compile=metal)]
    return losses, texts, args


def test_metal_configuration_matches_the_default_cpu_path(tiny_model_dir, corpus):
    default_losses, default_texts, default_args = _run(tiny_model_dir, corpus, metal=False)
    with fastmath.exact_ops():
        assert not fastmath.use_fast_cpu_ops()  # no polynomial GELU/softmax, no rope tables, no W^T copies
        metal_losses, metal_texts, metal_args = _run(tiny_model_dir, corpus, metal=True)
    assert fastmath.use_fast_cpu_ops()
    from mlx_moonshine.train.batches import use_buckets

    assert use_buckets(metal_args) and not use_buckets(default_args)  # bucketed shapes on the compiled path
    np.testing.assert_allclose(metal_losses, default_losses, rtol=1e-4, atol=1e-5)
    assert metal_texts == default_texts
    assert any(default_texts)  # the comparison says something
