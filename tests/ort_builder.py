"""Write small `.ort` flatbuffers at test time (no onnx package, no download).

`write_ort` stores initializers and nodes the way ONNX Runtime's format does; `runtime_like_graphs` lays
a model's HF weights out as the runtime's graphs store them: int8 Cast -> Mul -> Add chains (base),
uint8 weights of MatMulIntegerToFloat / DynamicQuantizeMatMul and a gathered uint8 embedding (tiny),
float32 norms, biases and convs. The graphs only carry weights (nothing computes end to end); they are
what the project's ORT reader and the runtime export read and rewrite.
"""

from __future__ import annotations

from pathlib import Path

import flatbuffers
import numpy as np
from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import (
    Attribute, Graph, InferenceSession, Model, Node, Tensor,
)
from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.AttributeType import AttributeType

DTYPE_CODES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.int64): 7}


def _strings(b, start_vector, items):
    offsets = [b.CreateString(s) for s in items]
    start_vector(b, len(offsets))
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def _tables(b, start_vector, offsets):
    start_vector(b, len(offsets))
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def write_ort(path: Path, initializers: dict[str, np.ndarray], nodes: list[tuple], outputs=("y",)) -> Path:
    """nodes: (op, name, inputs, outputs[, {int attribute: value}])."""
    b = flatbuffers.Builder(1024)
    tensors = []
    for name, arr in initializers.items():
        arr = np.ascontiguousarray(arr)
        name_off = b.CreateString(name)
        raw = b.CreateNumpyVector(np.frombuffer(arr.tobytes(), np.uint8))
        dims = b.CreateNumpyVector(np.asarray(arr.shape, np.int64))
        Tensor.Start(b)
        Tensor.AddName(b, name_off)
        Tensor.AddDims(b, dims)
        Tensor.AddDataType(b, DTYPE_CODES[arr.dtype])
        Tensor.AddRawData(b, raw)
        Tensor.AddExternalDataOffset(b, -1)
        tensors.append(Tensor.End(b))
    node_offs = []
    for i, (op, name, ins, outs, *rest) in enumerate(nodes):
        attrs = []
        for key, value in (rest[0] if rest else {}).items():
            key_off = b.CreateString(key)
            Attribute.Start(b)
            Attribute.AddName(b, key_off)
            Attribute.AddType(b, AttributeType.INT)
            Attribute.AddI(b, value)
            attrs.append(Attribute.End(b))
        op_off, name_off = b.CreateString(op), b.CreateString(name)
        ins_off = _strings(b, Node.StartInputsVector, ins)
        outs_off = _strings(b, Node.StartOutputsVector, outs)
        attrs_off = _tables(b, Node.StartAttributesVector, attrs)
        Node.Start(b)
        Node.AddName(b, name_off)
        Node.AddOpType(b, op_off)
        Node.AddIndex(b, i)
        Node.AddInputs(b, ins_off)
        Node.AddOutputs(b, outs_off)
        Node.AddAttributes(b, attrs_off)
        node_offs.append(Node.End(b))
    inits_off = _tables(b, Graph.StartInitializersVector, tensors)
    nodes_off = _tables(b, Graph.StartNodesVector, node_offs)
    graph_outputs = _strings(b, Graph.StartOutputsVector, list(outputs))
    Graph.Start(b)
    Graph.AddInitializers(b, inits_off)
    Graph.AddNodes(b, nodes_off)
    Graph.AddOutputs(b, graph_outputs)
    graph = Graph.End(b)
    Model.Start(b)
    Model.AddIrVersion(b, 8)
    Model.AddGraph(b, graph)
    model = Model.End(b)
    version = b.CreateString("1.17.0")
    InferenceSession.Start(b)
    InferenceSession.AddOrtVersion(b, version)
    InferenceSession.AddModel(b, model)
    b.Finish(InferenceSession.End(b), file_identifier=b"ORTM")
    Path(path).write_bytes(b.Output())
    return Path(path)


def _int8_affine(w):
    lo, hi = np.float32(w.min()), np.float32(w.max())
    scale = np.float32((hi - lo) / 255)
    zero = np.float32(hi - 127 * scale)
    return np.clip(np.rint((w - zero) / scale), -128, 127).astype(np.int8), scale, zero


def _uint8(w):
    lo, hi = min(np.float32(w.min()), 0), max(np.float32(w.max()), 0)
    scale = np.float32((hi - lo) / 255)
    zp = np.uint8(np.rint(-lo / scale))
    return np.clip(np.rint(w / scale) + zp, 0, 255).astype(np.uint8), scale, zp


def runtime_like_graphs(weights: dict[str, np.ndarray], folder: Path) -> Path:
    """encoder_model.ort + decoder_model_merged.ort holding `weights` (HF names and layout) -> folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, prefix in (("encoder_model", "model.encoder."), ("decoder_model_merged", "")):
        inits, nodes = {}, []
        for k, (hf, w) in enumerate(sorted((n, v) for n, v in weights.items()
                                           if n.startswith("model.encoder.") == (prefix != ""))):
            local = hf[len(prefix):]
            module, kind = local.rsplit(".", 1)
            scope = "/" + module.replace(".", "/")
            if w.ndim == 2 and "embed_tokens" in hf:  # uint8 rows, gathered then dequantized
                q, s, z = _uint8(w)
                inits.update({f"{local}_quantized": q, f"{local}_scale": np.array(s), f"{local}_zero_point": np.array(z)})
                nodes += [("Gather", f"{scope}/Gather", [f"{local}_quantized", "ids"], [f"g{k}"]),
                          ("DequantizeLinear", f"{scope}/Deq", [f"g{k}", f"{local}_scale", f"{local}_zero_point"],
                           [f"d{k}"])]
            elif w.ndim == 2 and k % 2:  # base: int8 weight-only, dequantized by the graph
                q, s, z = _int8_affine(w.T)
                base = f"onnx::MatMul_{k}"
                inits.update({f"{base}_quantized": q, f"{base}_scale": np.array([s]), f"{base}_zero_point": np.array([z])})
                nodes += [("Cast", f"c{k}", [f"{base}_quantized"], [f"cf{k}"], {"to": 1}),
                          ("Mul", f"m{k}", [f"cf{k}", f"{base}_scale"], [f"ms{k}"]),
                          ("Add", f"a{k}", [f"ms{k}", f"{base}_zero_point"], [f"w{k}"]),
                          ("MatMul", f"{scope}/MatMul", ["x", f"w{k}"], [f"y{k}"])]
            elif w.ndim == 2:  # tiny: ORT dynamic quantization
                q, s, z = _uint8(w.T)
                base = f"onnx::MatMul_{k}"
                inits.update({f"{base}_quantized": q, f"{base}_scale": np.array(s), f"{base}_zero_point": np.array(z)})
                nodes.append(("DynamicQuantizeMatMul", f"{scope}/MatMul_quant",
                              ["x", f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"], [f"y{k}"]))
            elif w.ndim == 3 or (kind == "bias" and "conv" in module):
                inits[local] = w.astype(np.float32)
                nodes.append(("Conv", f"{scope}/Conv", ["x", local] if kind == "weight" else ["x", "cw", local],
                              [f"y{k}"]))
            elif kind == "bias":  # a Linear's bias, added after its MatMul
                inits[f"onnx::Add_{k}"] = w.astype(np.float32)
                nodes.append(("Add", f"{scope}/Add", [f"onnx::Add_{k}", "x"], [f"y{k}"]))
            else:  # norm scales
                inits[local] = w.astype(np.float32)
                nodes.append(("LayerNormalization", f"{scope}/LayerNormalization", ["x", local], [f"y{k}"]))
        write_ort(folder / f"{stem}.ort", inits, nodes)
    (folder / "tokenizer.bin").write_bytes(b"tokenizer")
    return folder
