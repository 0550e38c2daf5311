"""`export runtime`: a tiny adapted model written into runtime-style `.ort` graphs built at test time.

The graphs come from tests/ort_builder.py (both quantisation schemes the shipped graphs use, float32
norms/biases/convs); the real graphs and the runtimes themselves are in test_runtime_real.py (slow).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_moonshine.adapters.apply import AdapterConfig, adapter_layers, apply_adapters, save_adapters
from mlx_moonshine.cli import main
from mlx_moonshine.export import runtime
from mlx_moonshine.export.hf import hf_state_dict, load_fused
from mlx_moonshine.export.runtime import (
    DECODER, ENCODER, RuntimeExportError, export_runtime, quantize_int8_affine, quantize_uint8_dynamic,
)
from mlx_moonshine.loading import load, save
from mlx_moonshine.convert.dequant import collect_params
from mlx_moonshine.convert.naming import name_params
from mlx_moonshine.convert.ort_graph import load_graph

pytest.importorskip("onnxruntime")
from ort_builder import runtime_like_graphs  # noqa: E402  (needs onnxruntime's flatbuffer schema)


def numpy_weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v, np.float32) for k, v in hf_state_dict(model).items()}


@pytest.fixture
def base_dir(tiny_model_dir, tmp_path, monkeypatch):
    """A tiny model converted from runtime-style graphs (its weights are their dequantized values), with
    those graphs standing in for the wheel's. -> model folder; the graphs are in tmp_path/reference."""
    model, processor = load(tiny_model_dir)
    ref = runtime_like_graphs(numpy_weights(model), tmp_path / "reference")
    # Like `convert`: the model holds what the graphs compute (only matrices are quantized here).
    model.load_weights([(k, mx.array(v)) for k, v in read_back(ref).items() if v.ndim == 2], strict=False)
    out = save(model, processor, tmp_path / "base")
    monkeypatch.setattr(runtime, "reference_graphs", lambda model_dir, log=None: ("moonshine-voice:tiny-en", ref))
    monkeypatch.setattr(runtime, "check_config", lambda model_dir, ref_dir: None)
    return out


@pytest.fixture
def reference(base_dir):
    return base_dir.parent / "reference"


@pytest.fixture
def adapter(base_dir, tmp_path):
    """LoRA on q/v/fc1 with random nonzero B, saved as an adapter folder."""
    model, _ = load(base_dir)
    config = AdapterConfig(kind="lora", r=4, alpha=8.0, targets=["q_proj", "v_proj", "fc1"], seed=1)
    apply_adapters(model, config)
    rng = np.random.default_rng(1)
    for _, layer in adapter_layers(model):
        layer.lora_B = layer.lora_B + mx.array(0.2 * rng.standard_normal(layer.lora_B.shape), mx.float32)
    return save_adapters(tmp_path / "adapter", model, config)


def read_back(folder) -> dict[str, np.ndarray]:
    enc, dec = load_graph(folder / ENCODER), load_graph(folder / DECODER)
    return {**name_params(enc, collect_params(enc), "model.encoder."), **name_params(dec, collect_params(dec), "")}


def test_requantisers_round_trip_within_half_a_step():
    w = np.random.default_rng(0).standard_normal((16, 24)).astype(np.float32)
    q, scale, zero = quantize_int8_affine(w)
    assert q.dtype == np.int8 and q.min() == -128 and q.max() == 127
    assert np.abs(q.astype(np.float32) * scale + zero - w).max() <= 0.5 * scale * (1 + 1e-5)
    q, scale, zp = quantize_uint8_dynamic(w)
    assert q.dtype == np.uint8 and zp.dtype == np.uint8
    assert np.abs((q.astype(np.int32) - int(zp)) * scale - w).max() <= 0.5 * scale * (1 + 1e-5)


def test_export_merges_the_adapter_and_keeps_untouched_tensors_byte_identical(base_dir, reference, adapter,
                                                                              tmp_path):
    out = tmp_path / "deploy"
    record = export_runtime(base_dir, out, adapter=adapter)
    assert sorted(p.name for p in out.iterdir()) == sorted([ENCODER, DECODER, "tokenizer.bin", "export.json"])
    assert (out / "tokenizer.bin").read_bytes() == (reference / "tokenizer.bin").read_bytes()
    assert json.loads((out / "export.json").read_text()) == record

    fused, _ = load_fused(base_dir, adapter)
    want, got = numpy_weights(fused), read_back(out)
    before = read_back(reference)
    rewritten = set(record["graphs"][ENCODER]["rewritten"]) | set(record["graphs"][DECODER]["rewritten"])
    adapted = {k for k in want if any(f"{t}.weight" in k for t in ("q_proj", "v_proj", "fc1"))}
    assert rewritten == adapted  # exactly the adapted layers are requantised
    for name, value in want.items():
        if name in adapted:
            step = (value.max() - min(value.min(), 0)) / 255  # either scheme's quantisation step, or less
            assert np.abs(got[name] - value).max() <= 0.5 * step * 1.01 + 1e-7, name
            assert not np.array_equal(got[name], before[name]), name
        else:
            np.testing.assert_array_equal(got[name], before[name], err_msg=name)
    for name in (ENCODER, DECODER):  # same layout: only the bytes of requantised tensors moved
        a, b = (reference / name).read_bytes(), (out / name).read_bytes()
        assert len(a) == len(b) and a != b


def test_unadapted_export_is_the_reference_byte_for_byte(base_dir, reference, tmp_path):
    record = export_runtime(base_dir, tmp_path / "plain")
    for name in (ENCODER, DECODER):
        assert (tmp_path / "plain" / name).read_bytes() == (reference / name).read_bytes()
        assert record["graphs"][name]["rewritten"] == []


def test_cli_export_runtime_refuses_to_overwrite(base_dir, adapter, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["export", "runtime", "--model", str(base_dir), "--adapter", str(adapter),
                              "-o", str(tmp_path / "o")])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(main, ["export", "runtime", "--model", str(base_dir), "-o", str(tmp_path / "o")])
    assert again.exit_code == 2 and "--force" in again.output


def test_a_model_not_converted_from_a_shortcut_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(RuntimeExportError, match="not converted from a PyPI shortcut.*moonshine-voice:tiny-en"):
        export_runtime(tiny_model_dir, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_streaming_model_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "moonshine_streaming"}))
    with pytest.raises(RuntimeExportError, match="moonshine_streaming.*export hf"):
        export_runtime(tmp_path / "m", tmp_path / "o")


def test_weights_without_a_place_in_the_graph_are_refused(base_dir, reference, tmp_path):
    src = reference / ENCODER
    model, _ = load(base_dir)
    weights = {k: v for k, v in numpy_weights(model).items() if k.startswith("model.encoder.")}
    weights["model.encoder.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    with pytest.raises(RuntimeExportError, match="without a place in the graph.*q_proj.bias"):
        runtime.patch_graph(src, tmp_path / ENCODER, weights, "model.encoder.")
    assert not (tmp_path / ENCODER).exists()
