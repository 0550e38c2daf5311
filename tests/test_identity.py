"""Identity at init, bit for bit: a fresh adapter (B = 0) leaves both architectures' outputs unchanged.

The contract (lora.py, fastmath.linear): an adapter layer computes its base product through the very call
the unwrapped model makes, and adds exact zeros at init. So equality is exact on every CPU and BLAS, not
"close": the same float operations in the same order. This is what makes resume, fuse and PEFT parity
trustworthy. The controls show the assertion is not vacuous: an adapter that is *not* identity (one
B entry of 1e-4) is caught.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_moonshine.adapters.apply import AdapterConfig, adapter_layers, apply_adapters
from mlx_moonshine.models.moonshine import Model, ModelArgs
from mlx_moonshine.models.streaming import StreamingArgs, StreamingModel

VOCAB = 40


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    """Non-identity norms and biases, so nothing in the comparison is trivially zero or one."""
    rng = np.random.default_rng(seed)
    updates = []
    for path, value in tree_flatten(model.parameters()):
        if value.ndim == 1:
            updates.append((path, value + mx.array(0.1 * rng.standard_normal(value.shape), value.dtype)))
    model.update(tree_unflatten(updates))
    return model


def base_model() -> Model:
    mx.random.seed(0)
    args = ModelArgs(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, encoder_num_hidden_layers=2,
                     decoder_num_hidden_layers=2, encoder_num_attention_heads=4, decoder_num_attention_heads=4,
                     attention_bias=True)
    return _perturbed(Model(args), 1)


def streaming_model() -> StreamingModel:
    mx.random.seed(0)
    args = StreamingArgs(
        encoder_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            sliding_windows=[[16, 4], [16, 0]]),
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2)
    return _perturbed(StreamingModel(args), 2)


BUILDERS = {"base": base_model, "streaming": streaming_model}


def _leaf_targets(model: nn.Module) -> list[str]:
    """Every adapter target the model offers: the leaf names of the Linear layers in its blocks."""
    return sorted({path.rsplit(".", 1)[-1] for path, m in model.named_modules()
                   if type(m) is nn.Linear and ".layers." in path})


def _inputs(rows: int):
    rng = np.random.default_rng(rows)
    audio = mx.array(0.3 * rng.standard_normal((2, 8000)).astype(np.float32))
    tokens = mx.array(np.concatenate([np.ones((2, 1)), rng.integers(3, VOCAB, (2, rows - 1))], 1).astype(np.int32))
    return audio, tokens


def _outputs(model, audio, tokens):
    """Teacher-forced logits, and the logits of one cached decoding step after a prefix (the GEMV path)."""
    lengths = mx.array([8000, 6000])
    memory, valid = model.encode(audio, lengths)
    logits = model(audio, tokens, mx.arange(audio.shape[1])[None, :] < lengths[:, None])
    cache = model.new_cache(memory, valid)
    _, cache = model.decode(tokens[:, :-1], memory, valid, cache)
    step_logits, _ = model.decode(tokens[:, -1:], memory, valid, cache)
    return [np.array(a.astype(mx.float32)) for a in (memory, logits, step_logits)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_fresh_adapter_on_every_target_is_bit_identical(arch, kind, dtype):
    model = BUILDERS[arch]()
    if dtype != "float32":
        model.set_dtype(getattr(mx, dtype))
    model.eval()
    targets = _leaf_targets(model)
    assert {"q_proj", "v_proj", "fc1"} <= set(targets), targets
    # 2 x 4 decoder rows take the contiguous-W^T GEMV path on the CPU, 2 x 12 the plain one: check both.
    for rows in (4, 12):
        audio, tokens = _inputs(rows)
        before = _outputs(model, audio, tokens)
        wrapped = BUILDERS[arch]()
        if dtype != "float32":
            wrapped.set_dtype(getattr(mx, dtype))
        apply_adapters(wrapped, AdapterConfig(kind=kind, r=4, alpha=8.0, targets=targets, dropout=0.1))
        wrapped.eval()
        assert len(adapter_layers(wrapped)) >= 10
        after = _outputs(wrapped, audio, tokens)
        for a, b in zip(after, before):
            np.testing.assert_array_equal(a, b)

        # Control: the same check catches an adapter that is not identity: one B entry of 1e-4
        # (bfloat16 rounds that away, so there every entry of one B is 1e-2).
        path, layer = adapter_layers(wrapped)[-1]
        if dtype == "float32":
            layer.lora_B = mx.zeros_like(layer.lora_B).at[0, 0].add(1e-4)
        else:
            layer.lora_B = mx.full(layer.lora_B.shape, 1e-2)
        changed = _outputs(wrapped, audio, tokens)
        assert any(not np.array_equal(a, b) for a, b in zip(changed, before)), path


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_identity_holds_in_training_mode_without_dropout(arch):
    """Training mode takes the plain matmul in both models: still exact (dropout 0)."""
    model = BUILDERS[arch]()
    audio, tokens = _inputs(6)
    model.train()
    mask = mx.arange(audio.shape[1])[None, :] < mx.array([8000, 6000])[:, None]
    before = np.array(model(audio, tokens, mask))
    wrapped = BUILDERS[arch]()
    apply_adapters(wrapped, AdapterConfig(kind="dora", r=2, targets=_leaf_targets(wrapped), dropout=0.0))
    wrapped.train()
    np.testing.assert_array_equal(np.array(wrapped(audio, tokens, mask)), before)
