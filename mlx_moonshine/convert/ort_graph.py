"""Read an ONNX Runtime (`.ort` flatbuffer) or ONNX (`.onnx` protobuf) graph into plain Python.

Both formats become the same `Graph`: every node (subgraphs of `If` nodes flattened into
one list, tagged with their scope) and every initializer as a numpy array. Subgraph nodes
refer to outer-scope values by name, and the Moonshine exports never shadow a name, so one
global name space is enough for the converter in `ort.py`.

`collect_params` then finds every weight: int8 initializers are dequantized by evaluating
the graph's own `Cast -> Mul -> Add` nodes in float32 numpy (each op rounded separately,
like ORT's element-wise kernels, so the weights equal the ones ORT computes).

`.ort` files are parsed with the flatbuffer schema that ships inside `onnxruntime`
(`pip install 'mlx-moonshine[ort]'`); `.onnx` files need the `onnx` package. Both are
imported inside the loaders so that neither is needed to import this module.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ModelError

# ONNX TensorProto.DataType -> numpy (the same codes are used by the ORT flatbuffers).
ONNX_DTYPES = {
    1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32,
    7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64,
}

ORT_INSTALL_HINT = "pip install 'mlx-moonshine[ort]' (onnxruntime and flatbuffers)"
ONNX_INSTALL_HINT = "pip install onnx"


@dataclass
class Node:
    scope: str  # "main", "main/<If node>.then_branch", ...
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict


@dataclass
class Graph:
    """All nodes and initializers of one model file, subgraphs flattened."""

    path: Path
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    # value name -> [(node reading it, input index)] / node writing it
    consumers: dict[str, list[tuple[Node, int]]] = field(default_factory=dict)
    producers: dict[str, Node] = field(default_factory=dict)

    def index(self) -> "Graph":
        """Fill `consumers` and `producers` once all nodes are known."""
        consumers = defaultdict(list)
        for node in self.nodes:
            for idx, name in enumerate(node.inputs):
                if name:  # "" marks an omitted optional input
                    consumers[name].append((node, idx))
            for name in node.outputs:
                self.producers[name] = node
        self.consumers = dict(consumers)
        return self

    def node(self, name: str) -> Node:
        """First node with this name (both `If` branches of the decoder hold identical copies)."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise ModelError(f"{self.path}: no node named {name!r}; this is not a Moonshine export "
                         "this converter understands (expected the HF/optimum Moonshine ONNX export)")

    def const(self, name: str) -> np.ndarray:
        if name not in self.initializers:
            raise ModelError(f"{self.path}: {name!r} is not a constant; unexpected Moonshine graph layout")
        return self.initializers[name]


def check(ok: bool, graph: Graph, what: str) -> None:
    """Graph-structure check: a failure means an export this converter does not understand."""
    if not ok:
        raise ModelError(f"{graph.path}: {what}; not a Moonshine ONNX export this converter understands")


def load_graph(path: Path) -> Graph:
    """Read `path` (`.ort` or `.onnx`) into a `Graph`.

    Raises:
        ModelError: the file is unreadable or the reader package is not installed.
    """
    path = Path(path)
    if path.suffix == ".ort":
        graph = _load_ort(path)
    elif path.suffix == ".onnx":
        graph = _load_onnx(path)
    else:
        raise ModelError(f"{path}: expected a .ort or .onnx file")
    return graph.index()


# --------------------------------------------------------------------------------------
# .ort (ONNX Runtime flatbuffer)
# --------------------------------------------------------------------------------------

def _load_ort(path: Path) -> Graph:
    try:
        from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession
        from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.AttributeType import (
            AttributeType,
        )
    except ImportError as e:
        raise ModelError(f"reading {path.name} needs onnxruntime's ORT format schema: "
                         f"{ORT_INSTALL_HINT}") from e
    buf = path.read_bytes()
    try:
        session = InferenceSession.InferenceSession.GetRootAs(buf, 0)
        root = session.Model().Graph()
        graph = Graph(path=path)
        graph.outputs = [root.Outputs(i).decode() for i in range(root.OutputsLength())]
        _walk_ort(graph, root, "main", AttributeType)
    except ModelError:
        raise
    except Exception as e:  # corrupt or not an ORT flatbuffer at all
        raise ModelError(f"{path}: cannot read as an ONNX Runtime .ort model ({type(e).__name__}: {e})") from e
    return graph


def _walk_ort(graph: Graph, g, scope: str, AT) -> None:
    for i in range(g.InitializersLength()):
        t = g.Initializers(i)
        name = t.Name().decode()
        if t.ExternalDataOffset() >= 0:
            raise ModelError(f"{graph.path}: initializer {name!r} uses external data, which is not supported")
        dims = [int(d) for d in t.DimsAsNumpy()] if t.DimsLength() else []
        raw = t.RawDataAsNumpy().tobytes() if t.RawDataLength() else b""
        graph.initializers[name] = np.frombuffer(raw, dtype=ONNX_DTYPES[t.DataType()]).reshape(dims)
    for i in range(g.NodesLength()):
        n = g.Nodes(i)
        name = (n.Name() or b"").decode()
        attrs = {}
        for a in range(n.AttributesLength()):
            at = n.Attributes(a)
            key, kind = at.Name().decode(), at.Type()
            if kind == AT.GRAPH:
                attrs[key] = f"{scope}/{name}.{key}"
                _walk_ort(graph, at.G(), attrs[key], AT)
            elif kind == AT.INT:
                attrs[key] = at.I()
            elif kind == AT.FLOAT:
                attrs[key] = at.F()
            elif kind == AT.INTS:
                attrs[key] = [int(x) for x in at.IntsAsNumpy()]
            elif kind == AT.FLOATS:
                attrs[key] = [float(x) for x in at.FloatsAsNumpy()]
            elif kind == AT.STRING:
                attrs[key] = at.S().decode()
        graph.nodes.append(Node(
            scope=scope, op=n.OpType().decode(), name=name,
            inputs=[n.Inputs(j).decode() for j in range(n.InputsLength())],
            outputs=[n.Outputs(j).decode() for j in range(n.OutputsLength())],
            attrs=attrs,
        ))


def initializer_spans(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (byte offset, byte length) of every initializer's raw data inside a `.ort` file.

    Lets a writer replace a tensor's values in place (same dtype and shape, so same length)
    and leave every other byte of the flatbuffer as it was.
    """
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.AttributeType import AttributeType

    buf = Path(path).read_bytes()
    base = np.frombuffer(buf, np.uint8).__array_interface__["data"][0]
    spans: dict[str, tuple[int, int]] = {}

    def walk(g) -> None:
        for i in range(g.InitializersLength()):
            t = g.Initializers(i)
            if t.RawDataLength():
                view = t.RawDataAsNumpy()  # a view into `buf`: its address gives the offset
                spans[t.Name().decode()] = (view.__array_interface__["data"][0] - base, int(view.size))
        for i in range(g.NodesLength()):
            n = g.Nodes(i)
            for a in range(n.AttributesLength()):
                if n.Attributes(a).Type() == AttributeType.GRAPH:
                    walk(n.Attributes(a).G())

    walk(InferenceSession.InferenceSession.GetRootAs(buf, 0).Model().Graph())
    return spans


# --------------------------------------------------------------------------------------
# .onnx (protobuf ModelProto)
# --------------------------------------------------------------------------------------

def _load_onnx(path: Path) -> Graph:
    try:
        import onnx
    except ImportError as e:
        raise ModelError(f"reading {path.name} needs the onnx package: {ONNX_INSTALL_HINT}") from e
    try:
        # External data (`<name>.onnx_data` next to the file) is loaded too.
        model = onnx.load(str(path))
    except Exception as e:
        raise ModelError(f"{path}: cannot read as an ONNX model ({type(e).__name__}: {e})") from e
    graph = Graph(path=path, outputs=[o.name for o in model.graph.output])
    _walk_onnx(graph, model.graph, "main")
    return graph


def _walk_onnx(graph: Graph, g, scope: str) -> None:
    from onnx import AttributeProto, helper, numpy_helper

    for t in g.initializer:
        graph.initializers[t.name] = numpy_helper.to_array(t)
    if len(g.sparse_initializer):
        raise ModelError(f"{graph.path}: sparse initializers are not supported")
    for n in g.node:
        # ORT turns Constant nodes into initializers when it writes a .ort file; do the
        # same so that both formats look alike to the converter.
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            graph.initializers[n.output[0]] = _constant_value(graph, n)
            continue
        attrs = {}
        for at in n.attribute:
            if at.type == AttributeProto.GRAPH:
                attrs[at.name] = f"{scope}/{n.name}.{at.name}"
                _walk_onnx(graph, at.g, attrs[at.name])
            elif at.type == AttributeProto.TENSOR:
                attrs[at.name] = numpy_helper.to_array(at.t)
            else:
                value = helper.get_attribute_value(at)
                if isinstance(value, bytes):
                    value = value.decode()
                elif isinstance(value, list):
                    value = [v.decode() if isinstance(v, bytes) else v for v in value]
                attrs[at.name] = value
        graph.nodes.append(Node(scope=scope, op=n.op_type, name=n.name, inputs=list(n.input),
                                outputs=list(n.output), attrs=attrs))


def _constant_value(graph: Graph, node) -> np.ndarray:
    from onnx import helper, numpy_helper

    (at,) = node.attribute
    if at.name == "value":
        return numpy_helper.to_array(at.t)
    value = helper.get_attribute_value(at)
    if at.name in ("value_float", "value_floats"):
        return np.asarray(value, dtype=np.float32)
    if at.name in ("value_int", "value_ints"):
        return np.asarray(value, dtype=np.int64)
    raise ModelError(f"{graph.path}: Constant node {node.name!r} uses unsupported attribute {at.name!r}")


# --------------------------------------------------------------------------------------
# Dequantization = folding the graph's own constant arithmetic
# --------------------------------------------------------------------------------------

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
