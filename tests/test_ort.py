"""ONNX / ORT -> Hugging Face checkpoint conversion (mlx_moonshine/convert/)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_moonshine  # noqa: F401  (preloads OpenBLAS before anything imports mlx)
from mlx_moonshine.convert import ort, wheels
from mlx_moonshine.errors import ModelError
from mlx_moonshine.convert.dequant import collect_params
from mlx_moonshine.convert.naming import name_params
from mlx_moonshine.convert.ort_graph import load_graph


def base_hf_dir() -> Path:
    env = os.environ.get("MLX_MOONSHINE_BASE_HF")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "models" / "base-hf"


def test_dir_without_model_files_names_the_expected_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelError) as err:
        ort.ort_to_hf(tmp_path, tmp_path / "out")
    msg = str(err.value)
    assert str(tmp_path) in msg and "encoder_model.ort" in msg and "decoder_model_merged.ort" in msg
    assert not (tmp_path / "out").exists()


def test_missing_dir_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not a directory"):
        ort.ort_to_hf(tmp_path / "nope", tmp_path / "out")


@pytest.mark.parametrize("spec", ["moonshine-cpp:tiny-xx", "moonshine-cpp", "other:base-en"])
def test_unknown_shortcut_lists_known_names(spec, tmp_path):
    with pytest.raises(ModelError) as err:
        wheels.resolve_moonshine_cpp(spec, cache_dir=tmp_path)
    assert repr(spec) in str(err.value) and "moonshine-cpp:base-en" in str(err.value)


def test_offline_pip_failure_names_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.setattr(wheels, "_installed_package_dir", lambda module: None)

    def no_network(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies "
                                                      "the requirement moonshine-cpp==0.1.4\n")

    monkeypatch.setattr(wheels.subprocess, "run", no_network)
    with pytest.raises(ModelError) as err:
        wheels.resolve_moonshine_cpp("moonshine-cpp:base-en", cache_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "moonshine-cpp==0.1.4" in msg
    assert "Hugging Face" in msg and "encoder_model.ort" in msg


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv(wheels.CACHE_ENV, str(tmp_path))
    assert wheels.cache_root() == tmp_path
    assert wheels.cache_root(tmp_path / "x") == tmp_path / "x"


@pytest.mark.parametrize("module, ext, hint", [("onnx", ".onnx", "pip install onnx"),
                                               ("onnxruntime", ".ort", "mlx-moonshine[ort]")])
def test_missing_reader_package_names_the_install(module, ext, hint, tmp_path, monkeypatch):
    for stem in ("encoder_model", "decoder_model_merged"):
        (tmp_path / f"{stem}{ext}").write_bytes(b"\0")
    (tmp_path / "tokenizer.json").write_text("{}")
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ModelError, match=hint.replace("[", r"\[").replace("]", r"\]")):
        ort.ort_to_hf(tmp_path, tmp_path / "out")


def test_onnx_reader_dequantizes_and_names_weights_inside_if_branches(tmp_path):
    """A tiny graph shaped like the merged decoder: int8 weight dequantized in the main graph,
    read by a MatMul in both branches of an If; a Constant node becomes an initializer."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w_int8 = rng.integers(-128, 128, size=(4, 3), dtype=np.int8)  # [in, out] as torch.onnx stores it
    scale, zero = np.float32(0.0123), np.float32(-0.004)
    inits = [numpy_helper.from_array(w_int8, "onnx::MatMul_7_quantized"),
             numpy_helper.from_array(np.array([scale], np.float32), "onnx::MatMul_7_scale"),
             numpy_helper.from_array(np.array([zero], np.float32), "onnx::MatMul_7_zero_point")]
    dequant = [
        helper.make_node("Cast", ["onnx::MatMul_7_quantized"], ["w_f"], to=TensorProto.FLOAT, name="c"),
        helper.make_node("Mul", ["w_f", "onnx::MatMul_7_scale"], ["w_s"], name="m"),
        helper.make_node("Add", ["w_s", "onnx::MatMul_7_zero_point"], ["w"], name="a"),
        helper.make_node("Constant", [], ["/eps"], value=numpy_helper.from_array(np.array(1e-5, np.float32))),
    ]

    def branch(tag: str):
        node = helper.make_node("MatMul", ["x", "w"], [f"y_{tag}"],
                                name="/model/decoder/layers.0/mlp/up_proj/MatMul")
        return helper.make_graph([node], tag, [], [helper.make_tensor_value_info(f"y_{tag}", TensorProto.FLOAT, None)])

    if_node = helper.make_node("If", ["cond"], ["y"], name="optimum::if",
                               then_branch=branch("then"), else_branch=branch("else"))
    graph = helper.make_graph(
        dequant + [if_node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    path = tmp_path / "decoder_model_merged.onnx"
    onnx.save(helper.make_model(graph), str(path))

    g = load_graph(path)
    assert {n.scope for n in g.nodes} == {"main", "main/optimum::if.then_branch", "main/optimum::if.else_branch"}
    assert g.initializers["/eps"].item() == np.float32(1e-5)
    params = collect_params(g)
    assert [p.source for p in params] == ["onnx::MatMul_7_quantized"]
    assert params[0].recipe == "int8 -> Cast(to=float32) -> Mul(scale[1]) -> Add(zero_point[1])"
    named = name_params(g, params, prefix="")
    expected = (w_int8.astype(np.float32) * scale + zero).T  # nn.Linear layout [out, in]
    np.testing.assert_array_equal(named["model.decoder.layers.0.mlp.fc1.weight"], expected)


@pytest.mark.slow
def test_real_moonshine_cpp_base_matches_reference_checkpoint(tmp_path):
    ref = base_hf_dir()
    if not (ref / "model.safetensors").is_file():
        pytest.skip(f"reference checkpoint {ref} not found (set MLX_MOONSHINE_BASE_HF)")
    if importlib.util.find_spec("moonshine_cpp") is None or importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("needs the moonshine-cpp wheel and onnxruntime installed")
    from safetensors.numpy import load_file

    pkg = Path(importlib.util.find_spec("moonshine_cpp").submodule_search_locations[0])
    ort_dir = pkg / "models" / "base-en"
    lines: list[str] = []
    # The reference tokenizer.json is the same file; passing it keeps this test offline.
    info = ort.ort_to_hf(ort_dir, tmp_path, tokenizer_json=ref / "tokenizer.json", log=lines.append)

    got, want = load_file(str(tmp_path / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == np.float32 and got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)

    cfg, ref_cfg = (json.loads((d / "config.json").read_text()) for d in (tmp_path, ref))
    ref_cfg.pop("transformers_version", None)
    assert cfg == ref_cfg
    for name in ("generation_config.json", "preprocessor_config.json", "tokenizer.json"):
        assert (tmp_path / name).is_file(), name
    assert info["quantization"]["int8_tensors"] == 132 and info["tensors"] == len(want)
    assert set(info["source"]) == {"encoder", "decoder", "tokenizer"}
    assert all(len(s["sha256"]) == 64 for s in info["source"].values())
    json.dumps(info)  # the caller writes it into its conversion record
    assert lines  # progress went through the callback
