"""Read an ONNX Runtime (`.ort` flatbuffer) or ONNX (`.onnx` protobuf) graph into plain Python.

Both formats become the same `Graph`: every node (subgraphs of `If` nodes flattened into
one list, tagged with their scope) and every initializer as a numpy array. Subgraph nodes
refer to outer-scope values by name, and the Moonshine exports never shadow a name, so one
global name space is enough for the converter (`dequant.py` finds the weights in it,
`naming.py` names them).

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
