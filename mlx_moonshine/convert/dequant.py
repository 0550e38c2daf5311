"""Every weight a Moonshine graph reads, as float32: its int8/uint8 initializers dequantized as the graph does.

int8 weights stored for the float ops are turned back into float by the graph's own constant
`Cast -> Mul -> Add` nodes; `fold_constants` evaluates those nodes in float32 numpy (each op rounded
separately, like ORT's element-wise kernels, so the weights equal the ones ORT computes). The uint8
weights of ORT's quantized operators (MatMulIntegerToFloat, DynamicQuantizeMatMul, a gathered
embedding) are never turned back into float inside the graph; `dequantize` computes what those
operators read. `collect_params` gathers both, and the float32 parameters stored as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ort_graph import ONNX_DTYPES, Graph, check


FOLDABLE_OPS = {
    "Cast": lambda x, attrs: x.astype(ONNX_DTYPES[attrs["to"]]),
    "Mul": lambda a, b, attrs: np.multiply(a, b),
    "Add": lambda a, b, attrs: np.add(a, b),
    "Sub": lambda a, b, attrs: np.subtract(a, b),
    "Div": lambda a, b, attrs: np.divide(a, b),
}


@dataclass
class Param:
    """One weight as the graph uses it, before naming."""

    tensor: str  # graph value the consuming layer reads
    value: np.ndarray
    source: str  # initializer it comes from
    recipe: str  # e.g. "int8 -> Cast(to=float32) -> Mul(scale[1]) -> Add(zero_point[1])"


def fold_constants(graph: Graph) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, list[str]]]]:
    """Evaluate every Cast/Mul/Add/Sub/Div node whose inputs are all constants.

    Returns:
        The values of all constants, and per folded value (root initializer, ops applied).
    """
    values = dict(graph.initializers)
    lineage: dict[str, tuple[str, list[str]]] = {}
    pending = [n for n in graph.nodes if n.op in FOLDABLE_OPS]
    while True:
        ready = [n for n in pending if all(x in values for x in n.inputs)]
        if not ready:
            break
        for node in ready:
            args = [values[x] for x in node.inputs]
            out = FOLDABLE_OPS[node.op](*args, node.attrs)
            check(out.dtype == args[0].dtype or node.op == "Cast", graph,
                   f"{node.name} changes dtype {args[0].dtype} -> {out.dtype}")
            values[node.outputs[0]] = out
            # Which int8 initializer this value derives from, and through which ops (other
            # operands named relative to it, with their shape: "Mul(scale[1])").
            chain = next((x for x in node.inputs if x in lineage), None)
            if chain:
                root, ops = lineage[chain]
            else:
                ints = [x for x in node.inputs if values[x].dtype in (np.int8, np.uint8)]
                root, ops = (ints[0] if ints else node.inputs[0]), []
            stem = root.removesuffix("quantized")
            operands = [f"{x.removeprefix(stem)}{list(values[x].shape)}"
                        for x in node.inputs if x not in (chain, root)]
            step = f"Cast(to={out.dtype})" if node.op == "Cast" else f"{node.op}({', '.join(operands)})"
            lineage[node.outputs[0]] = (root, ops + [step])
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    return values, lineage


# Quantized operators of ORT's dynamic quantization (`quantize_dynamic`, then the ORT optimizer):
# op -> input index of the uint8 weight, of its per-tensor scale and of its zero point.
QUANT_WEIGHT_INPUTS = {
    "MatMulIntegerToFloat": (1, 3, 5),  # A_q, B_q, a_scale, b_scale, a_zero_point, b_zero_point[, bias]
    "DynamicQuantizeMatMul": (1, 2, 3),  # A (float), B_q, b_scale, b_zero_point[, bias]
}


@dataclass
class QuantWeight:
    """A uint8/int8 weight the runtime reads as is: float value = (q - zero_point) * scale."""

    data: str  # initializer names
    scale: str
    zero_point: str
    reader: str  # op that reads it: a QUANT_WEIGHT_INPUTS op, or "Gather" (embedding, DequantizeLinear after)


def quantized_weights(graph: Graph) -> dict[str, QuantWeight]:
    """Every weight stored for ORT's quantized operators, by its data initializer.

    These weights are never turned back into float inside the graph: MatMulIntegerToFloat and
    DynamicQuantizeMatMul multiply by them in integers; the embedding is gathered in uint8 and
    the picked rows go through DequantizeLinear.
    """
    found: dict[str, QuantWeight] = {}

    def add(data: str, scale: str, zero: str, reader: str) -> None:
        ok = all(x in graph.initializers for x in (data, scale, zero)) and graph.initializers[scale].size == 1 \
            and graph.initializers[zero].size == 1
        check(ok, graph, f"{reader} weight {data!r} has no constant per-tensor scale / zero point")
        check(found.get(data, QuantWeight(data, scale, zero, reader)) == QuantWeight(data, scale, zero, reader),
              graph, f"{data!r} is read with two different scales")
        found[data] = QuantWeight(data, scale, zero, reader)

    for node in graph.nodes:
        if node.op in QUANT_WEIGHT_INPUTS:
            b, s, z = (node.inputs[i] if i < len(node.inputs) else "" for i in QUANT_WEIGHT_INPUTS[node.op])
            if b in graph.initializers:
                add(b, s, z, node.op)
        elif node.op == "Gather" and graph.initializers.get(node.inputs[0], np.zeros(0)).dtype in (np.uint8, np.int8):
            deq = [c for c, i in graph.consumers.get(node.outputs[0], []) if c.op == "DequantizeLinear" and i == 0]
            # (Both `If` branches hold a copy of the Gather and its DequantizeLinear.)
            check(bool(deq) and all(len(d.inputs) == 3 for d in deq), graph,
                  f"{node.name}: gathered int8 rows are not dequantized by DequantizeLinear")
            for d in deq:
                add(node.inputs[0], d.inputs[1], d.inputs[2], "Gather")
    return found


def dequantize(graph: Graph, q: QuantWeight) -> np.ndarray:
    """(q - zero_point) * scale in float32: the integer difference is exact, one rounding after."""
    data, zero = graph.initializers[q.data], graph.initializers[q.zero_point]
    diff = data.astype(np.int32) - zero.astype(np.int32).reshape(())
    return (diff.astype(np.float32) * graph.initializers[q.scale].astype(np.float32).reshape(())).astype(np.float32)


def collect_params(graph: Graph) -> list[Param]:
    """Every tensor a layer reads as a weight.

    int8 initializers are followed along their folded dequantization chain to its end; the
    uint8 weights of ORT's quantized operators are dequantized as those operators read them;
    float32 initializers named like parameters (state-dict names, or `onnx::Op_N`) are used
    as they are. Graph-internal constants (names starting with '/': eps, shapes, inv_freq)
    are not parameters; `derive_config` reads a few of them.
    """
    quant = quantized_weights(graph)
    scales = {x for q in quant.values() for x in (q.scale, q.zero_point)}
    values, lineage = fold_constants(graph)
    folded_consumed = {x for n in graph.nodes if n.outputs and n.outputs[0] in lineage for x in n.inputs}
    ends_by_root: dict[str, list[str]] = {}
    for t, (root, _) in lineage.items():
        # End of a chain: a folded value read by a node that is not itself folded.
        if any(n.outputs[0] not in lineage for n, _ in graph.consumers.get(t, [])):
            ends_by_root.setdefault(root, []).append(t)
    params = []
    for name, arr in graph.initializers.items():
        if name in quant:
            q = quant[name]
            params.append(Param(name, dequantize(graph, q), name,
                                f"{arr.dtype} -> (q - zero_point[]) * scale[] in {q.reader}"))
        elif name in scales:
            continue
        elif arr.dtype in (np.int8, np.uint8):
            ends = ends_by_root.get(name, [])
            check(len(ends) == 1, graph, f"int8 initializer {name!r} has {len(ends)} dequantized uses")
            params.append(Param(ends[0], values[ends[0]], name,
                                f"{arr.dtype} -> " + " -> ".join(lineage[ends[0]][1])))
        elif (arr.dtype == np.float32 and arr.size > 1 and not name.startswith("/")
              and not name.endswith(("_scale", "_zero_point")) and not name.startswith("present.")):
            check(name not in folded_consumed, graph, f"float parameter {name!r} feeds a constant expression")
            params.append(Param(name, arr, name, "float32 (stored as is)"))
    return params
