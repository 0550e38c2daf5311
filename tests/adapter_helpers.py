"""Helpers for the adapter export tests: a tiny random MLX Moonshine (no torch) and saved adapters on it."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from conftest import write_tiny_tokenizer
from mlx_moonshine.adapters.apply import AdapterConfig, adapter_layers, apply_adapters, save_adapters
from mlx_moonshine.loading import load

TINY = dict(vocab_size=40, hidden_size=32, intermediate_size=48, encoder_num_hidden_layers=2,
            decoder_num_hidden_layers=2, encoder_num_attention_heads=2, decoder_num_attention_heads=2,
            max_position_embeddings=64, partial_rotary_factor=0.62, pad_head_dim_to_multiple_of=8)
KINDS = {"lora": ("lora", "default"), "dora": ("dora", "default"), "pissa": ("lora", "pissa"),
         "dora-pissa": ("dora", "pissa")}


def make_adapter(model_dir, out, kind="lora", seed=1):
    """A saved adapter on q/v/fc1 everywhere with random nonzero B (and magnitude) -> folder."""
    adapter_kind, init = KINDS[kind]
    model, _ = load(model_dir)
    config = AdapterConfig(kind=adapter_kind, r=4, alpha=6.0, init=init, targets=["q_proj", "v_proj", "fc1"],
                           use_rslora=kind == "pissa", seed=seed)
    apply_adapters(model, config)
    rng = np.random.default_rng(seed)
    for _, layer in adapter_layers(model):
        layer.lora_B = layer.lora_B + mx.array(0.05 * rng.standard_normal(layer.lora_B.shape), mx.float32)
        if "magnitude" in layer:
            layer.magnitude = layer.magnitude * mx.array(1 + 0.1 * rng.standard_normal(layer.magnitude.shape),
                                                         mx.float32)
    return save_adapters(out, model, config)


def inputs(seed=0):
    x = (0.1 * np.random.default_rng(seed).standard_normal((1, 9000))).astype(np.float32)
    return x, np.array([[1, 5, 7, 3, 9, 11]], np.int32)


def mlx_logits(model_dir, adapter=None):
    model, _ = load(model_dir, adapter=adapter)
    x, ids = inputs()
    return np.array(model(mx.array(x), mx.array(ids)))




def write_mlx_model(folder: Path, seed: int = 0, **overrides) -> Path:
    """A saved MLX model folder: a random tiny Moonshine of TINY's shape (plus `overrides`), no torch."""
    from mlx_moonshine.audio import AudioConfig
    from mlx_moonshine.loading import Processor, save
    from mlx_moonshine.models.moonshine import Model, ModelArgs
    from mlx_moonshine.tokenizer import Tokenizer

    folder = Path(folder)
    src = folder.with_name(folder.name + "-src")
    src.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(write_tiny_tokenizer(src / "tokenizer.json"))
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(dict(TINY, **overrides)))
    processor = Processor(tokenizer=tok, audio=AudioConfig(), path=src,
                          generation={"bos_token_id": 1, "decoder_start_token_id": 1, "eos_token_id": 2})
    return save(model, processor, folder)
