"""Export to Moonshine's own runtime: a model folder that moonshine-cpp / moonshine-voice load unchanged.

    export_runtime("models/tiny", "deploy/tiny-atc", adapter="runs/atc")
    # moonshine_cpp.MoonshineModel(model_dir_path="deploy/tiny-atc", model_type="tiny")

The runtime runs ONNX Runtime over `encoder_model.ort`, `decoder_model_merged.ort` and `tokenizer.bin`.
Rather than re-exporting a graph, the export takes the runtime's own graphs for this architecture (from
the wheel `convert` read them from) and writes the merged weights into them:

1. the adapter is fused into the weights (`adapters.fuse_model`),
2. every weight is found in the graph by the same naming `convert` used (`naming.named_sources`),
3. weights that differ from the shipped ones are requantised per tensor with the scheme the graph already
   uses (base: int8 `q * scale + zero`, Cast -> Mul -> Add; tiny: ORT's dynamic uint8 `(q - zero_point) *
   scale`), and their bytes (data, scale, zero point) are overwritten in place: same dtypes and shapes,
   so the flatbuffer keeps its layout and every unchanged tensor stays byte for byte what shipped.

What the runtime's graphs cannot express is refused: a Streaming model, a model not converted from a
PyPI shortcut (no reference graph), a config or weight set that differs from the reference graph.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from ..errors import ModelError
from ..io import atomic_dir, atomic_write_bytes, atomic_write_json, prepare_out_dir, sha256_file

PathLike = Union[str, Path]
Log = Optional[Callable[[str], None]]
ENCODER, DECODER, TOKENIZER = "encoder_model.ort", "decoder_model_merged.ort", "tokenizer.bin"
EXPORT_RECORD = "export.json"  # ignored by the runtime, which opens its three files by name

# Config fields the reference graph fixes; a model that differs cannot be written into it.
GRAPH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "encoder_num_hidden_layers",
                "decoder_num_hidden_layers", "encoder_num_attention_heads", "decoder_num_attention_heads",
                "encoder_num_key_value_heads", "decoder_num_key_value_heads", "encoder_hidden_act",
                "decoder_hidden_act", "attention_bias", "tie_word_embeddings", "bos_token_id", "eos_token_id")


class RuntimeExportError(ModelError):
    """The model cannot be written into Moonshine's runtime graphs."""


def _note(log: Log, msg: str) -> None:
    if log is not None:
        log(msg)


# --------------------------------------------------------------------------------------
# Requantisation: the two per-tensor schemes the shipped graphs use
# --------------------------------------------------------------------------------------

def quantize_int8_affine(w: np.ndarray) -> tuple[np.ndarray, np.float32, np.float32]:
    """(q int8, scale, zero) with w ~ q * scale + zero, q = -128 at min(w) and 127 at max(w) (base)."""
    lo, hi = np.float32(w.min()), np.float32(w.max())
    scale = np.float32((hi - lo) / np.float32(255)) if hi > lo else np.float32(1.0)
    zero = np.float32(hi - np.float32(127) * scale)  # as the shipped base files compute it (bit for bit)
    q = np.clip(np.rint((w - zero) / scale), -128, 127).astype(np.int8)
    return q, scale, zero


def quantize_uint8_dynamic(w: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """(q uint8, scale, zero_point) with w ~ (q - zero_point) * scale, the range widened to hold 0,
    as onnxruntime.quantization.quantize_dynamic quantizes weights (tiny)."""
    lo, hi = min(np.float32(w.min()), np.float32(0)), max(np.float32(w.max()), np.float32(0))
    scale = np.float32((hi - lo) / np.float32(255)) if hi > lo else np.float32(1.0)
    zero_point = np.uint8(np.clip(np.rint(-lo / scale), 0, 255))
    q = np.clip(np.rint(w / scale) + np.float32(zero_point), 0, 255).astype(np.uint8)
    return q, scale, zero_point


@dataclass(frozen=True)
class Slot:
    """One HF parameter inside a graph: the initializers holding it and how they encode it."""

    hf_name: str
    data: str  # initializer with the values (int8/uint8 data, or float32)
    scheme: str  # "float32" | "int8-affine" | "uint8-dynamic"
    scale: str = ""
    zero: str = ""
    transform: Optional[str] = None  # graph layout -> HF layout ("transpose", "flatten")


def _int8_affine_names(graph, data: str) -> tuple[str, str]:
    """(scale, zero) initializers of data's Cast -> Mul(scale) -> Add(zero) chain."""
    def single_reader(value: str, op: str):
        readers = graph.consumers.get(value, [])
        ok = len(readers) == 1 and readers[0][0].op == op
        if not ok:
            raise RuntimeExportError(f"{graph.path}: {data!r} is not dequantized by Cast -> Mul -> Add; "
                                     "this graph's quantisation is not one the export can rewrite")
        return readers[0][0]

    cast = single_reader(data, "Cast")
    mul = single_reader(cast.outputs[0], "Mul")
    add = single_reader(mul.outputs[0], "Add")
    (scale,) = [x for x in mul.inputs if x != cast.outputs[0]]
    (zero,) = [x for x in add.inputs if x != mul.outputs[0]]
    return scale, zero


def graph_slots(graph, prefix: str, tied: bool = True) -> dict[str, list[Slot]]:
    """HF name -> the slots holding it (two for a tied embedding stored again as proj_out)."""
    from ..convert.dequant import collect_params, quantized_weights
    from ..convert.naming import named_sources

    quant = quantized_weights(graph)
    slots: dict[str, list[Slot]] = {}
    for name, src in named_sources(graph, collect_params(graph), prefix).items():
        arr = graph.initializers[src.initializer]
        if src.initializer in quant:
            q = quant[src.initializer]
            if arr.dtype != np.uint8:
                raise RuntimeExportError(f"{graph.path}: {src.initializer!r} is {arr.dtype} in {q.reader}; "
                                         "only uint8 dynamic quantisation can be rewritten")
            slot = Slot(name, src.initializer, "uint8-dynamic", q.scale, q.zero_point, src.transform)
        elif arr.dtype == np.int8:
            scale, zero = _int8_affine_names(graph, src.initializer)
            slot = Slot(name, src.initializer, "int8-affine", scale, zero, src.transform)
        else:
            slot = Slot(name, src.initializer, "float32", transform=src.transform)
        # A tied head stored again for the runtime's logits MatMul is the embedding (convert checked it).
        hf_name = "model.decoder.embed_tokens.weight" if tied and name == "proj_out.weight" else name
        slots.setdefault(hf_name, []).append(replace(slot, hf_name=hf_name))
    return slots


def _to_graph_layout(value: np.ndarray, slot: Slot, shape: tuple[int, ...]) -> np.ndarray:
    if slot.transform == "transpose":
        value = value.T
    return np.ascontiguousarray(value.reshape(shape), dtype=np.float32)


def encode(slot: Slot, w: np.ndarray) -> tuple[dict[str, bytes], float]:
    """The new bytes of the slot's initializers for weight `w` (graph layout), and the max |error|."""
    if slot.scheme == "float32":
        return {slot.data: w.astype(np.float32).tobytes()}, 0.0
    if slot.scheme == "int8-affine":
        q, scale, zero = quantize_int8_affine(w)
        back = q.astype(np.float32) * scale + zero
        values = {slot.data: q, slot.scale: np.array([scale], np.float32), slot.zero: np.array([zero], np.float32)}
    else:
        q, scale, zero = quantize_uint8_dynamic(w)
        back = (q.astype(np.int32) - int(zero)).astype(np.float32) * scale
        values = {slot.data: q, slot.scale: np.array(scale, np.float32), slot.zero: np.array(zero, np.uint8)}
    return {k: v.tobytes() for k, v in values.items()}, float(np.abs(back - w).max())


def patch_graph(src: Path, dst: Path, weights: dict[str, np.ndarray], prefix: str) -> dict:
    """Write `src` to `dst` with every weight of `weights` (HF names and layout, fp32) that differs
    from the graph's own value requantised into place; all other bytes are copied.

    Args:
        src: A reference `.ort` graph.
        dst: Where to write the patched graph (via a temporary file and a rename).
        weights: HF name -> value; must hold exactly the parameters the graph stores.
        prefix: HF prefix of the graph's scope-relative names ("model.encoder." for the encoder, else "").

    Returns:
        {"tensors": parameters in the graph, "rewritten": names requantised, "max_abs_error": largest
        |requantised - merged| over them}.
    """
    from ..convert.ort_graph import initializer_spans, load_graph

    graph = load_graph(src)
    slots = graph_slots(graph, prefix, tied="proj_out.weight" not in weights)
    missing, extra = sorted(set(slots) - set(weights)), sorted(set(weights) - set(slots))
    if missing or extra:
        raise RuntimeExportError(f"{src.name}: the model's weights do not fit the runtime graph: "
                                 f"{len(missing)} graph weights without a value {missing[:3]}, {len(extra)} "
                                 f"weights without a place in the graph {extra[:3]}")
    spans = initializer_spans(src)
    buf = bytearray(src.read_bytes())
    rewritten, max_err, owners = [], 0.0, {}
    for name, group in sorted(slots.items()):
        for slot in group:
            ref = graph.initializers[slot.data]
            new = _to_graph_layout(weights[name], slot, ref.shape)
            reference = _reference_value(graph, slot)
            if np.array_equal(new, reference):
                continue  # bytes stay exactly as shipped
            patches, err = encode(slot, new)
            for init, data in patches.items():
                # A scale shared with a tensor that keeps its values would change that tensor too.
                if len(graph.consumers.get(init, [])) > 1 and init != slot.data and owners.get(init, name) != name:
                    raise RuntimeExportError(f"{src.name}: {init!r} is shared by several weights; cannot "
                                             f"requantise {name} alone")
                owners[init] = name
                offset, length = spans[init]
                assert len(data) == length, (init, len(data), length)
                buf[offset:offset + length] = data
            rewritten.append(name)
            max_err = max(max_err, err)
    atomic_write_bytes(dst, bytes(buf))
    return {"tensors": len(slots), "rewritten": sorted(set(rewritten)), "max_abs_error": max_err}


def _reference_value(graph, slot: Slot) -> np.ndarray:
    """The slot's float value as `convert` read it (graph layout)."""
    from ..convert.dequant import QuantWeight, dequantize

    data = graph.initializers[slot.data]
    if slot.scheme == "float32":
        return data.astype(np.float32)
    if slot.scheme == "uint8-dynamic":
        return dequantize(graph, QuantWeight(slot.data, slot.scale, slot.zero, ""))
    scale, zero = graph.initializers[slot.scale], graph.initializers[slot.zero]
    return np.add(np.multiply(data.astype(np.float32), scale), zero)  # Cast -> Mul -> Add, as dequant folds


# --------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------

def reference_graphs(model_dir: Path, log: Log = None) -> tuple[str, Path]:
    """(shortcut, runtime folder) of the wheel `model_dir` was converted from; refuses other models."""
    from ..loading import _read_json
    from ..convert.wheels import ENCODER_STEM, DECODER_STEM, SHORTCUTS, resolve_shortcut

    config = _read_json(model_dir / "config.json")
    if config.get("model_type", "moonshine") != "moonshine":
        raise RuntimeExportError(f"{model_dir}: model_type {config.get('model_type')!r}; Moonshine's runtime "
                                 "graphs exist for tiny and base (model_type 'moonshine') only; use `export hf` "
                                 "or `export peft` for this model")
    record = _read_json(model_dir / "conversion.json")
    spec = record.get("source")
    if spec not in SHORTCUTS:
        how = ("it is a fused model: pass its base folder and --adapter instead" if "fused_from" in record else
               f"its conversion.json names source {spec!r}")
        raise RuntimeExportError(f"{model_dir}: not converted from a PyPI shortcut ({how}); the runtime's graphs "
                                 f"come from that wheel: `mlx-moonshine convert {' or '.join(SHORTCUTS)} -o DIR`, "
                                 "train on DIR, then export")
    if record.get("dtype", "float32") != "float32":
        raise RuntimeExportError(f"{model_dir}: converted with --dtype {record['dtype']}; convert {spec} again "
                                 "without --dtype (float32) so that unchanged weights stay exactly as shipped")
    ref_dir, _ = resolve_shortcut(spec, log=log)
    recorded = record.get("ort", {}).get("source", {})
    for role, stem in (("encoder", ENCODER_STEM), ("decoder", DECODER_STEM)):
        want = recorded.get(role, {}).get("sha256")
        got = sha256_file(ref_dir / f"{stem}.ort")
        if want is not None and want != got:
            raise RuntimeExportError(f"{ref_dir / (stem + '.ort')}: differs from the graph {model_dir} was "
                                     f"converted from (sha256 {got[:12]} vs {want[:12]}); reinstall "
                                     f"{'=='.join(SHORTCUTS[spec].wheel)} or clear the cache")
    return spec, ref_dir


def check_config(model_dir: Path, ref_dir: Path) -> None:
    """Refuse a config.json that differs from what the reference graphs compute, naming every field."""
    from ..loading import _read_json
    from ..convert.dequant import collect_params
    from ..convert.hf_config import derive_config
    from ..convert.naming import name_params
    from ..convert.ort_graph import load_graph

    enc, dec = load_graph(ref_dir / ENCODER), load_graph(ref_dir / DECODER)
    weights = {**name_params(enc, collect_params(enc), "model.encoder."),
               **name_params(dec, collect_params(dec), "")}
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    fields, _ = derive_config(enc, dec, weights, tokenizer)
    config = _read_json(model_dir / "config.json")
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta"))
    factor = rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    head_dim = fields["hidden_size"] // fields["encoder_num_attention_heads"]
    bad = [f"{k}={config.get(k)!r} (graph: {fields[k]!r})" for k in GRAPH_FIELDS if config.get(k) != fields[k]]
    ref_rope = fields["rope_parameters"]
    if theta != ref_rope["rope_theta"] or factor is None or \
            int(head_dim * factor) != int(head_dim * ref_rope["partial_rotary_factor"]):
        bad.append(f"rope theta/partial factor {theta}/{factor} (graph: {ref_rope['rope_theta']}/"
                   f"{ref_rope['partial_rotary_factor']})")
    if bad:
        raise RuntimeExportError(f"{model_dir}/config.json does not match the runtime graph in {ref_dir}: "
                                 f"{'; '.join(bad)}")


def export_runtime(model_dir: PathLike, out_dir: PathLike, adapter: Optional[PathLike] = None, *,
                   force: bool = False, log: Log = None) -> dict:
    """Write a Moonshine runtime model folder: encoder_model.ort, decoder_model_merged.ort, tokenizer.bin.

    Args:
        model_dir: MLX model folder converted from `moonshine-cpp:base-en` or `moonshine-voice:tiny-en`.
        out_dir: Folder to write; also gets export.json (provenance, rewritten tensors, requantisation error).
        adapter: Optional training run or adapter folder, merged into the weights.
        force: Overwrite a non-empty `out_dir`.
        log: Optional callable receiving progress lines.

    Returns:
        The export record written to export.json.

    Raises:
        RuntimeExportError: a model the runtime's graphs cannot express.
    """
    from ..loading import resolve_model_dir
    from .hf import hf_state_dict, load_fused

    out_dir = prepare_out_dir(out_dir, force)
    model_dir = resolve_model_dir(model_dir)
    spec, ref_dir = reference_graphs(model_dir, log)
    check_config(model_dir, ref_dir)
    _note(log, f"merging {'adapter ' + str(adapter) if adapter else 'no adapter'} into {model_dir}")
    model, _ = load_fused(model_dir, adapter)
    # HF names and layouts (conv kernels (out, in, k)), as `convert` read them from the graph.
    weights = {k: np.array(v, dtype=np.float32) for k, v in hf_state_dict(model).items()}
    from ..convert.wheels import SHORTCUTS

    record = {"source": spec, "architecture": SHORTCUTS[spec].architecture, "reference": {},
              "adapter": None if adapter is None else str(adapter),
              "model": str(model_dir), "graphs": {}}
    with atomic_dir(out_dir) as tmp:
        encoder_names = {k for k in weights if k.startswith("model.encoder.")}
        for name, prefix, subset in ((ENCODER, "model.encoder.", encoder_names),
                                     (DECODER, "", set(weights) - encoder_names)):
            _note(log, f"writing {name}")
            part = {k: weights[k] for k in subset}
            stats = patch_graph(ref_dir / name, tmp / name, part, prefix)
            record["reference"][name] = sha256_file(ref_dir / name)
            record["graphs"][name] = {**stats, "sha256": sha256_file(tmp / name)}
        shutil.copy2(ref_dir / TOKENIZER, tmp / TOKENIZER)
        atomic_write_json(tmp / EXPORT_RECORD, record)
    n = sum(len(g["rewritten"]) for g in record["graphs"].values())
    _note(log, f"wrote {out_dir}: {n} tensors requantised, the rest as shipped in {spec}")
    return record

