"""LoRA / DoRA / PiSSA layers and adapter targeting, saving, loading and fusing.

PEFT (torch) is the oracle for the layer math; the model-level tests use a small stand-in module tree
with the Hugging Face paths, plus one tiny random `Model`.
"""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_moonshine.adapters.apply import (
    AdapterConfig,
    adapter_layers,
    apply_adapters,
    find_targets,
    fuse_model,
    load_adapters,
    save_adapters,
)
from mlx_moonshine.adapters.dora import DoRALinear
from mlx_moonshine.errors import ModelError
from mlx_moonshine.models.fastmath import linear as base_linear
from mlx_moonshine.adapters.lora import LoRALinear

# -- a stand-in model with Moonshine's module paths ---------------------------------------------


class Attn(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.o_proj = nn.Linear(D, D, bias=False)

    def __call__(self, x, mem):
        return self.o_proj(nn.tanh(self.q_proj(x) + self.k_proj(mem) * self.v_proj(mem)))


class MLP(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)

    def __call__(self, x):
        return self.fc2(nn.gelu(self.fc1(x)))


class EncLayer(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.self_attn, self.mlp = Attn(D), MLP(D, 2 * D)

    def __call__(self, x):
        x = x + self.self_attn(x, x)
        return x + self.mlp(x)


class DecLayer(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.self_attn, self.encoder_attn, self.mlp = Attn(D), Attn(D), MLP(D, 3 * D)

    def __call__(self, x, mem):
        x = x + self.self_attn(x, x)
        x = x + self.encoder_attn(x, mem)
        return x + self.mlp(x)


class Stack(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = layers


class Inner(nn.Module):
    def __init__(self, D, n_enc, n_dec):
        super().__init__()
        self.encoder = Stack([EncLayer(D) for _ in range(n_enc)])
        self.decoder = Stack([DecLayer(D) for _ in range(n_dec)])


class StandIn(nn.Module):
    def __init__(self, D=16, n_enc=2, n_dec=2, seed=0):
        super().__init__()
        mx.random.seed(seed)
        self.model = Inner(D, n_enc, n_dec)
        self.proj_out = nn.Linear(D, 7, bias=False)  # never a target

    def __call__(self, x):
        mem = x
        for layer in self.model.encoder.layers:
            mem = layer(mem)
        for layer in self.model.decoder.layers:
            x = layer(x, mem)
        return self.proj_out(x)


def _x(shape=(2, 5, 16), seed=1):
    return mx.random.normal(shape, key=mx.random.key(seed))


def _randomize(model_or_layer, seed=3):
    """Give every adapter a nonzero update (B, and magnitude for DoRA)."""
    layers = (adapter_layers(model_or_layer) if not isinstance(model_or_layer, LoRALinear)
              else [("", model_or_layer)])
    for i, (_, layer) in enumerate(layers):
        k1, k2 = mx.random.split(mx.random.key(seed + i))
        layer.lora_B = 0.1 * mx.random.normal(layer.lora_B.shape, key=k1)
        if isinstance(layer, DoRALinear):
            layer.magnitude = layer.magnitude * (1 + 0.1 * mx.random.normal(layer.magnitude.shape, key=k2))


def _close(a, b, atol):
    a, b = np.array(a, dtype=np.float32), np.array(b, dtype=np.float32)
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


# -- layers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,init", [("lora", "default"), ("dora", "default"), ("lora", "pissa"),
                                       ("dora", "pissa"), ("lora", "pissa_niter_2")])
def test_identity_at_init(kind, init):
    model = StandIn()
    x = _x()
    ref = model(x)
    cfg = AdapterConfig(kind=kind, r=4, init=init, targets=["q_proj", "v_proj", "fc1", "o_proj"])
    apply_adapters(model, cfg)
    atol = 1e-5 if init.startswith("pissa") else 1e-6
    _close(model(x), ref, atol)


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
@pytest.mark.parametrize("init", ["default", "pissa"])
def test_fuse_matches_forward(cls, init):
    layer = cls.from_base(nn.Linear(24, 20), r=4, alpha=8.0, init=init)
    _randomize(layer)
    x = _x((3, 24))
    fused = layer.fuse()
    assert type(fused) is nn.Linear and "bias" in fused
    _close(fused(x), layer(x), 1e-5)


def test_fuse_model_replaces_every_adapter():
    model = StandIn()
    apply_adapters(model, AdapterConfig(kind="dora", r=2))
    _randomize(model)
    x = _x()
    ref = model(x)
    paths = fuse_model(model)
    assert len(paths) == 12 and not adapter_layers(model)
    _close(model(x), ref, 1e-5)


def test_scale_conventions_and_fp32_adapters():
    base = nn.Linear(16, 8)
    base.set_dtype(mx.float16)
    layer = LoRALinear.from_base(base, r=4, alpha=8.0)
    assert layer.scale == 2.0 and layer.lora_A.dtype == mx.float32 and layer.lora_B.shape == (8, 4)
    assert LoRALinear.from_base(nn.Linear(16, 8), r=4, alpha=8.0, use_rslora=True).scale == 4.0
    bound = 1 / math.sqrt(16)  # PEFT's kaiming_uniform(a=sqrt(5)) bound
    assert float(mx.abs(layer.lora_A).max()) <= bound and float(mx.abs(layer.lora_A).max()) > 0.5 * bound
    x = _x((2, 16)).astype(mx.float16)
    assert layer(x).dtype == mx.float16
    _close(layer(x), base_linear(base, x), 0)  # exactly the base product the unwrapped model computes
    assert layer.fuse().weight.dtype == mx.float16


def test_quantized_base():
    base = nn.QuantizedLinear.from_linear(nn.Linear(64, 32))
    layer = DoRALinear.from_base(base, r=4)
    x = _x((2, 64))
    _close(layer(x), base(x), 1e-5)
    _randomize(layer)
    assert isinstance(layer.fuse(), nn.QuantizedLinear)
    _close(layer.fuse(de_quantize=True)(x), layer(x), 1e-4)


def test_flat_lora_perturbs_only_in_training():
    layer = LoRALinear.from_base(nn.Linear(16, 8), r=2, perturb_sigma=0.05)
    x = _x((4, 16))
    layer.train()
    a, b = layer(x), layer(x)
    assert not np.allclose(np.array(a), np.array(b))  # resampled every call
    layer.eval()
    _close(layer(x), base_linear(layer.linear, x), 0)
    quiet = LoRALinear.from_base(nn.Linear(16, 8), r=2)  # off by default
    quiet.train()
    _close(quiet(x), base_linear(quiet.linear, x), 0)


# -- PEFT parity --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_linear():
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    def build(mlx_layer, use_dora, dropout=0.0):
        W, b = np.array(mlx_layer.linear.weight), mlx_layer.linear.get("bias")
        base = torch.nn.Linear(W.shape[1], W.shape[0], bias=b is not None)
        with torch.no_grad():
            base.weight.copy_(torch.from_numpy(W))
            if b is not None:
                base.bias.copy_(torch.from_numpy(np.array(b)))
        cfg = LoraConfig(r=mlx_layer.r, lora_alpha=mlx_layer.alpha, use_dora=use_dora,
                         use_rslora=mlx_layer.use_rslora, lora_dropout=dropout)
        peft_layer = Linear(base, "default", config=cfg, r=mlx_layer.r, lora_alpha=mlx_layer.alpha)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(torch.from_numpy(np.array(mlx_layer.lora_A)))
            peft_layer.lora_B["default"].weight.copy_(torch.from_numpy(np.array(mlx_layer.lora_B)))
            if use_dora:
                peft_layer.lora_magnitude_vector["default"].weight.copy_(
                    torch.from_numpy(np.array(mlx_layer.magnitude)))
        return peft_layer

    return torch, build


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_grads_match_peft(peft_linear, cls, use_rslora):
    torch, build = peft_linear
    layer = cls.from_base(nn.Linear(24, 20), r=4, alpha=6.0, use_rslora=use_rslora, key=mx.random.key(5))
    _randomize(layer)
    ref = build(layer, use_dora=cls is DoRALinear)
    x, g = _x((3, 24)), _x((3, 20), seed=2)

    xt, gt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(g))
    yt = ref(xt)
    (yt * gt).sum().backward()
    _close(layer(x), yt.detach().numpy(), 1e-5)

    keys = ["lora_A", "lora_B"] + (["magnitude"] if cls is DoRALinear else [])
    grads = nn.value_and_grad(layer, lambda x: (layer(x) * g).sum())(x)[1]
    torch_grads = {"lora_A": ref.lora_A["default"].weight.grad, "lora_B": ref.lora_B["default"].weight.grad}
    if cls is DoRALinear:
        torch_grads["magnitude"] = ref.lora_magnitude_vector["default"].weight.grad
    assert sorted(k for k, _ in tree_flatten(grads)) == sorted(keys)
    for k in keys:
        _close(grads[k], torch_grads[k].numpy(), 1e-4)


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_dropout_branch_matches_peft(peft_linear, cls):
    """Training-mode dropout with one fixed mask on both sides (PEFT's DoRA reroutes the base path)."""
    torch, build = peft_linear
    layer = cls.from_base(nn.Linear(24, 20), r=4, alpha=8.0, dropout=0.3)
    _randomize(layer)
    ref = build(layer, use_dora=cls is DoRALinear, dropout=0.3)
    x = _x((3, 24))
    mask = (np.random.default_rng(0).random((3, 24)) > 0.3).astype(np.float32) / 0.7

    class FixedDropout(nn.Module):
        def __call__(self, x):
            return x * mx.array(mask)

    class TorchFixedDropout(torch.nn.Dropout):
        def forward(self, x):
            return x * torch.from_numpy(mask)

    layer.dropout = FixedDropout()
    ref.lora_dropout["default"] = TorchFixedDropout(0.3)
    layer.train()
    ref.train()
    _close(layer(x), ref(torch.from_numpy(np.array(x))).detach().numpy(), 1e-5)


def test_pissa_matches_peft(peft_linear):
    torch, _ = peft_linear
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    base = nn.Linear(24, 20)
    W = np.array(base.weight)
    layer = LoRALinear.from_base(base, r=4, alpha=8.0, init="pissa")
    tbase = torch.nn.Linear(24, 20)
    with torch.no_grad():
        tbase.weight.copy_(torch.from_numpy(W))
    ref = Linear(tbase, "default", config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa"), r=4,
                 lora_alpha=8)
    tA, tB = ref.lora_A["default"].weight.detach().numpy(), ref.lora_B["default"].weight.detach().numpy()
    # Singular vectors are defined up to sign: compare the products and the residual base.
    _close(layer.lora_B @ layer.lora_A, tB @ tA, 1e-5)
    _close(layer.linear.weight, tbase.weight.detach().numpy(), 1e-5)
    _close(mx.linalg.norm(layer.lora_A, axis=1), np.linalg.norm(tA, axis=1), 1e-5)
    _close(layer.pissa_A0, layer.lora_A, 0)


def test_pissa_niter_and_conversion_to_plain_lora():
    # A weight with a clear spectral gap after rank 4, so the randomized SVD finds the same subspace.
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    V, _ = np.linalg.qr(rng.standard_normal((24, 24)))
    S = np.array([9, 7, 5, 4] + [0.1] * 16)
    W = (U * S) @ V[:20]
    base = nn.Linear(24, 20)
    base.weight = mx.array(W.astype(np.float32))
    ref_base = nn.Linear(24, 20)
    ref_base.weight = mx.array(W.astype(np.float32))
    full = LoRALinear.from_base(ref_base, r=4, init="pissa")  # exact SVD
    fast = LoRALinear.from_base(base, r=4, alpha=16.0, use_rslora=True, init="pissa_niter_4", seed=1)
    _close(fast.delta_weight(), full.delta_weight(), 1e-4)
    _close(fast.linear.weight + fast.delta_weight(), W, 1e-5)

    _randomize(fast)
    A, B, alpha = fast.lora_against_original_base()
    assert A.shape == (8, 24) and B.shape == (20, 8) and math.isclose(alpha, 16.0 * math.sqrt(2))
    scale = alpha / math.sqrt(8)  # rsLoRA at rank 2r
    _close(W + scale * (B @ A), fast.fused_weight(), 1e-5)


# -- targeting ----------------------------------------------------------------------------------


def _paths(prefix, n, blocks, leaves):
    return [f"model.{prefix}.layers.{i}.{b}.{leaf}" for i in range(n) for b in blocks for leaf in leaves]


def test_default_targets():
    model = StandIn(n_enc=2, n_dec=3)
    paths = apply_adapters(model, AdapterConfig())
    expected = (_paths("encoder", 2, ["self_attn"], ["q_proj", "v_proj"])
                + _paths("decoder", 3, ["self_attn", "encoder_attn"], ["q_proj", "v_proj"]))
    assert paths == expected
    assert [p for p, _ in adapter_layers(model)] == sorted(expected)


def test_scope_layers_and_suffix_targets():
    model = StandIn(n_enc=3, n_dec=3)
    cfg = AdapterConfig(targets=["q_proj", "fc1"], scope=["decoder_cross"], layers=[0, -1])
    assert find_targets(model, cfg) == [
        "model.decoder.layers.0.encoder_attn.q_proj", "model.decoder.layers.0.mlp.fc1",
        "model.decoder.layers.2.encoder_attn.q_proj", "model.decoder.layers.2.mlp.fc1"]
    cfg = AdapterConfig(targets=["fc2"], scope=["encoder"], layers=[1])
    assert find_targets(model, cfg) == ["model.encoder.layers.1.mlp.fc2"]
    cfg = AdapterConfig(targets=["self_attn.q_proj"], scope=["decoder_self", "decoder_cross"])
    assert find_targets(model, cfg) == _paths("decoder", 3, ["self_attn"], ["q_proj"])
    with pytest.raises(ModelError, match="q_prj"):
        find_targets(model, AdapterConfig(targets=["q_prj"]))
    with pytest.raises(ModelError, match="out of range"):
        find_targets(model, AdapterConfig(layers=[7]))
    with pytest.raises(ModelError, match="kind .*scope"):
        AdapterConfig(kind="ia3", scope=["cross"])


def test_trainable_parameters_are_adapter_only():
    model = StandIn()
    apply_adapters(model, AdapterConfig(kind="dora", init="pissa", targets=["q_proj", "fc2"]))
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.rsplit(".", 1)[1] in ("lora_A", "lora_B", "magnitude") for k in names)
    assert len(names) == 3 * 10


def test_config_json_tolerates_unknown_keys(tmp_path):
    cfg = AdapterConfig(kind="dora", r=2, targets="q_proj, fc1", layers=[0])
    (tmp_path / "c.json").write_text(json.dumps({**cfg.to_dict(), "future_option": 1}))
    assert AdapterConfig.from_json(tmp_path / "c.json") == cfg
    assert cfg.targets == ["q_proj", "fc1"]


# -- save / load --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,init", [("lora", "default"), ("dora", "pissa")])
def test_save_load_round_trip(tmp_path, kind, init):
    model = StandIn()
    cfg = AdapterConfig(kind=kind, r=3, init=init, targets=["q_proj", "v_proj", "fc1"], layers=[1])
    apply_adapters(model, cfg)
    _randomize(model)
    x = _x()
    ref = model(x)
    save_adapters(tmp_path, model, cfg)
    saved = mx.load(str(tmp_path / "adapters.safetensors"))
    assert all(v.dtype == mx.float32 for v in saved.values())
    assert ("model.decoder.layers.1.encoder_attn.q_proj.lora_A" in saved)
    assert any(k.endswith(".pissa_A0") for k in saved) == (init == "pissa")

    fresh = StandIn()  # same seed: same base weights
    loaded = load_adapters(fresh, tmp_path)
    assert loaded.modules == cfg.modules
    for key, value in saved.items():
        _close(dict(tree_flatten(fresh.parameters()))[key], value, 0)
    _close(fresh(x), ref, 1e-6)
    fuse_model(fresh)
    _close(fresh(x), ref, 1e-5)


def test_load_into_wrong_model_lists_every_mismatch(tmp_path):
    model = StandIn(D=16, n_enc=2, n_dec=2)
    cfg = AdapterConfig(kind="dora", r=2)
    apply_adapters(model, cfg)
    save_adapters(tmp_path, model, cfg)
    other = StandIn(D=24, n_enc=1, n_dec=2)
    before = dict(tree_flatten(other.parameters()))
    with pytest.raises(ModelError) as err:
        load_adapters(other, tmp_path)
    msg = str(err.value)
    assert "module model.encoder.layers.1.self_attn.q_proj is not a Linear" in msg
    assert "encoder.layers.0.self_attn.q_proj.lora_A has shape [2, 16], this model expects [2, 24]" in msg
    assert "decoder.layers.1.encoder_attn.v_proj.magnitude has shape [16], this model expects [24]" in msg
    # 2 absent encoder modules + 10 present modules x 3 tensors with the wrong shape.
    assert "(32 problems" in msg
    assert not adapter_layers(other) and dict(tree_flatten(other.parameters())).keys() == before.keys()

    with pytest.raises(ModelError, match="lacks adapters.safetensors"):
        (tmp_path / "adapters.safetensors").unlink()
        load_adapters(other, tmp_path)


# -- the real model class -----------------------------------------------------------------------


def test_tiny_moonshine_model():
    from mlx_moonshine.models import moonshine as model_mod
    args = model_mod.ModelArgs(vocab_size=50, hidden_size=32, intermediate_size=48,
                               encoder_num_hidden_layers=2, decoder_num_hidden_layers=2,
                               encoder_num_attention_heads=4, decoder_num_attention_heads=4)
    mx.random.seed(0)
    model = model_mod.Model(args)
    audio = mx.random.normal((1, 3000), key=mx.random.key(0))
    tokens = mx.array([[1, 5, 7]])
    ref = model(audio, tokens)
    paths = apply_adapters(model, AdapterConfig(kind="dora", r=4, targets=["q_proj", "v_proj", "fc1"]))
    assert len(paths) == 2 * 3 + 2 * 5
    assert "model.decoder.layers.1.encoder_attn.v_proj" in paths
    _close(model(audio, tokens), ref, 1e-5)
    _randomize(model)
    adapted = model(audio, tokens)
    fuse_model(model)
    _close(model(audio, tokens), adapted, 1e-4)
