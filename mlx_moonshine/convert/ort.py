"""Convert a Moonshine ONNX / ONNX Runtime export into a Hugging Face-format checkpoint.

The PyPI wheels `moonshine-cpp==0.1.4` and `moonshine-voice==0.1.0` ship the real Moonshine
*base* and *tiny* weights as two `.ort` graphs each (the HF `MoonshineEncoder`, and optimum's
"merged" decoder: an `If` node with a no-cache and a with-cache branch). Every matrix is
weight-only int8: an initializer `X_quantized` plus per-tensor `X_scale` / `X_zero_point` that
the graph turns back into float with `Cast -> Mul -> Add`. The conversion

1. reads both graphs (`ort_graph.load_graph`),
2. dequantizes every weight by evaluating those graph nodes in float32 numpy (`dequant.collect_params`;
   each op rounded separately, like ORT's element-wise kernels, so the weights equal ORT's),
3. names each anonymous initializer (`onnx::MatMul_1947`) after the node that reads it
   (`/layers.0/self_attn/q_proj/MatMul` -> `model.encoder.layers.0.self_attn.q_proj.weight`),
   transposing MatMul weights to `nn.Linear`'s [out, in] (`naming.name_params`),
4. derives the `MoonshineConfig` fields from the graph (sizes, heads, RoPE, activations,
   norm epsilons, weight tying; `hf_config.derive_config`), and
5. writes the files `save_pretrained` would write, in fp32 (here).

The result is a *dequantized int8* model: the network moonshine-cpp runs, not the fp32
UsefulSensors/moonshine-base checkpoint bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..audio import SAMPLE_RATE
from ..errors import ModelError
from ..io import atomic_save_safetensors, atomic_write_bytes, atomic_write_text, sha256_file
from .dequant import collect_params
from .hf_config import derive_config, expected_shapes
from .naming import LEGACY_TO_HF_MODULE, name_params
from .ort_graph import load_graph
from .wheels import DECODER_STEM, ENCODER_STEM

Log = Callable[[str], None] | None


# Fixed MoonshineConfig fields that `save_pretrained` writes for this architecture.
FIXED_CONFIG_FIELDS = {
    "architectures": ["MoonshineForConditionalGeneration"],
    "model_type": "moonshine",
    "is_encoder_decoder": True,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "dtype": "float32",
}


def _note(log: Log, msg: str) -> None:
    if log is not None:
        log(msg)


def find_model_files(src_dir: Path) -> tuple[Path, Path]:
    """(encoder, decoder) model files in src_dir or src_dir/onnx; `.ort` preferred over `.onnx`."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise ModelError(f"{src_dir}: not a directory; expected a folder holding "
                         f"{ENCODER_STEM}.ort/.onnx and {DECODER_STEM}.ort/.onnx")
    for folder in (src_dir, src_dir / "onnx"):
        for ext in (".ort", ".onnx"):
            enc, dec = folder / f"{ENCODER_STEM}{ext}", folder / f"{DECODER_STEM}{ext}"
            if enc.is_file() and dec.is_file():
                return enc, dec
    raise ModelError(f"{src_dir}: no Moonshine ONNX export found; expected {ENCODER_STEM}.ort and "
                     f"{DECODER_STEM}.ort (or the .onnx pair) in it, e.g. from the moonshine-cpp wheel "
                     "(use the shortcut moonshine-cpp:base-en)")


def _json(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _read_tokenizer(src_dir: Path, encoder_file: Path, tokenizer_json: Path | None) -> tuple[Path, dict]:
    """(path, parsed JSON) of the tokenizer.json given, or of the one next to the export."""
    if tokenizer_json is None:
        tokenizer_json = next((p for p in (src_dir / "tokenizer.json", encoder_file.parent / "tokenizer.json")
                               if p.is_file()), None)
        if tokenizer_json is None:
            raise ModelError(f"{src_dir}: no tokenizer.json; pass the Moonshine tokenizer.json explicitly "
                             "(tokenizer_json=...)")
    tokenizer_json = Path(tokenizer_json)
    try:
        return tokenizer_json, json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{tokenizer_json}: cannot read as a tokenizer.json ({e})") from e


def _check_complete(src_dir: Path, weights: dict[str, np.ndarray], fields: dict) -> None:
    """Refuse weights that are not exactly the state dict `fields` describes, naming the mismatches."""
    expected = expected_shapes(fields)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    bad = {k: (tuple(weights[k].shape), expected[k]) for k in set(weights) & set(expected)
           if tuple(weights[k].shape) != expected[k]}
    if missing or unexpected or bad:
        raise ModelError(f"{src_dir}: graph weights do not form a Moonshine checkpoint: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}, "
                         f"wrong shapes {dict(list(bad.items())[:5])}")


def _write_checkpoint(out_dir: Path, weights: dict[str, np.ndarray], fields: dict, tokenizer_json: Path) -> None:
    """The files `save_pretrained` (and the processor's) would write, weights in fp32."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out_dir / "model.safetensors", dict(sorted(weights.items())),
                            metadata={"format": "pt"})
    # config.json in the transformers-5 layout (rope_parameters), plus the legacy top-level
    # rope keys of the upstream Hub file so readers of either layout find them.
    config = {**FIXED_CONFIG_FIELDS, **fields,
              "partial_rotary_factor": fields["rope_parameters"]["partial_rotary_factor"],
              "rope_theta": fields["rope_parameters"]["rope_theta"]}
    atomic_write_text(out_dir / "config.json", _json(config))
    atomic_write_text(out_dir / "generation_config.json", _json({
        "bos_token_id": fields["bos_token_id"], "decoder_start_token_id": fields["decoder_start_token_id"],
        "eos_token_id": fields["eos_token_id"], "pad_token_id": fields["pad_token_id"],
        "max_length": fields["max_position_embeddings"], "do_sample": False, "num_beams": 1,
        "use_cache": True}))
    # Raw 16 kHz float audio; neither moonshine-cpp nor useful-moonshine-onnx normalizes it.
    atomic_write_text(out_dir / "preprocessor_config.json", _json({
        "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
        "sampling_rate": SAMPLE_RATE, "padding_value": 0.0, "padding_side": "right",
        "do_normalize": False, "return_attention_mask": True}))
    atomic_write_bytes(out_dir / "tokenizer.json", tokenizer_json.read_bytes())
    atomic_write_text(out_dir / "tokenizer_config.json", _json({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": fields["max_position_embeddings"]}))


def ort_to_hf(src_dir: Path, out_dir: Path, *, tokenizer_json: Path | None = None,
              log: Log = None) -> dict:
    """Convert a Moonshine ONNX/ORT export into a Hugging Face checkpoint directory.

    Args:
        src_dir: Folder with `encoder_model.{ort,onnx}` and `decoder_model_merged.{ort,onnx}`
            (or an `onnx/` subfolder holding them).
        out_dir: Destination; receives config.json, generation_config.json, model.safetensors
            (fp32), tokenizer.json, tokenizer_config.json and preprocessor_config.json.
        tokenizer_json: HF tokenizer.json; default: `tokenizer.json` in src_dir.
        log: Optional callable receiving progress lines.

    Returns:
        Provenance: source files with sha256, quantisation summary, config provenance,
        tensor and parameter counts (JSON-serialisable, for the caller's conversion record).

    Raises:
        ModelError: missing inputs or reader packages, or a graph this converter does not understand.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    encoder_file, decoder_file = find_model_files(src_dir)
    tokenizer_json, tokenizer = _read_tokenizer(src_dir, encoder_file, tokenizer_json)

    _note(log, f"reading {encoder_file.name} and {decoder_file.name} from {encoder_file.parent}")
    enc, dec = load_graph(encoder_file), load_graph(decoder_file)
    enc_params, dec_params = collect_params(enc), collect_params(dec)
    weights = {**name_params(enc, enc_params, prefix="model.encoder."),
               **name_params(dec, dec_params, prefix="")}
    fields, provenance = derive_config(enc, dec, weights, tokenizer)
    weights.pop("proj_out.weight", None)  # tied: derive_config checked it equals embed_tokens
    _check_complete(src_dir, weights, fields)

    _note(log, f"writing {len(weights)} tensors to {out_dir}")
    _write_checkpoint(out_dir, weights, fields, tokenizer_json)

    params = enc_params + dec_params
    n_int8 = sum(p.recipe.startswith("int8") for p in params)
    return {
        "source": {role: {"file": str(path.resolve()), "sha256": sha256_file(path)}
                   for role, path in (("encoder", encoder_file), ("decoder", decoder_file),
                                      ("tokenizer", tokenizer_json))},
        "quantization": {"int8_tensors": n_int8, "float32_tensors": len(params) - n_int8,
                         "recipes": sorted({p.recipe for p in params}),
                         "stored_dtype": "float32"},
        "renamed_modules": dict(LEGACY_TO_HF_MODULE),
        "config_provenance": provenance,
        "tensors": len(weights),
        "parameters": int(sum(v.size for v in weights.values())),
    }
