"""Hugging Face parameter names for a graph's weights: each tensor is named after the node that reads it.

Export names are anonymous (`onnx::MatMul_1947`), so a weight is named after its consumer's scope
(`/layers.0/self_attn/q_proj/MatMul` -> `layers.0.self_attn.q_proj.weight`, under the caller's
prefix), with the legacy module names of the exporting transformers renamed, and moved into the
HF layout (MatMul weights transposed to `nn.Linear`'s [out, in]).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from .dequant import Param
from .ort_graph import Graph, check


# The graphs come from an older transformers Moonshine whose attention output projection
# was `dense` and whose decoder MLP used `up_proj`/`down_proj`.
LEGACY_TO_HF_MODULE = {"dense": "o_proj", "up_proj": "fc1", "down_proj": "fc2"}


def module_path(node_name: str) -> str:
    """'/model/decoder/layers.0/self_attn/q_proj/MatMul' -> 'model.decoder.layers.0.self_attn.q_proj'"""
    parts = node_name.strip("/").split("/")[:-1]
    return ".".join(LEGACY_TO_HF_MODULE.get(p, p) for p in parts)


def _export_name(node_name: str, kind: str) -> str:
    """Like module_path without renames: the name torch.onnx gave the tensor."""
    return ".".join(node_name.strip("/").split("/")[:-1]) + "." + kind


# (op_type, input index) -> (parameter kind, transform to HF layout)
CONSUMER_RULES = {
    ("MatMul", 1): ("weight", "transpose"),  # x @ W[in, out] -> nn.Linear.weight [out, in]
    ("Conv", 1): ("weight", None),
    ("Conv", 2): ("bias", None),
    ("Gather", 0): ("weight", None),  # embedding lookup
    ("Mul", 1): ("weight", "flatten"),  # LayerNorm / GroupNorm affine scale
    ("Add", 1): ("bias", "flatten"),  # GroupNorm affine shift
    ("Add", 0): ("bias", "flatten"),  # Linear bias (the exporter puts it first)
    # ORT-optimized graphs (moonshine-voice tiny): fused and dynamically quantized operators.
    ("MatMulIntegerToFloat", 1): ("weight", "transpose"),
    ("DynamicQuantizeMatMul", 1): ("weight", "transpose"),
    ("DynamicQuantizeMatMul", 4): ("bias", None),
    ("MatMulIntegerToFloat", 6): ("bias", None),
    ("FusedConv", 1): ("weight", None),
    ("FusedConv", 2): ("bias", None),
    ("LayerNormalization", 1): ("weight", None),
    ("SkipLayerNormalization", 2): ("weight", None),
}
# Float constants that look like parameters but are not: RoPE's inv_freq, broadcast by Expand.
NOT_PARAMETERS = {("Expand", 0)}
# Suffixes the exporter and the ORT optimizer add to an initializer's name.
SOURCE_SUFFIXES = r"(_merged_\d+)?(_quantized)?(_add_tensor)?$"


class Source(NamedTuple):
    """Where one HF parameter lives in a graph."""

    value: np.ndarray  # float32, HF layout
    initializer: str  # the stored tensor (int8/uint8 data, or float32 as is)
    transform: str | None  # graph layout -> HF: "transpose", "flatten" or None


def name_params(graph: Graph, params: list[Param], prefix: str) -> dict[str, np.ndarray]:
    """Map every Param to its HF name; readers in both `If` branches must agree."""
    return {name: src.value for name, src in named_sources(graph, params, prefix).items()}


def named_sources(graph: Graph, params: list[Param], prefix: str) -> dict[str, Source]:
    """HF name -> its `Source`, for every Param."""
    named: dict[str, Source] = {}
    for p in params:
        names, transforms = set(), set()
        own = re.sub(SOURCE_SUFFIXES, "", p.source)  # exporter's name, if kept
        readers = [(node, idx) for node, idx in graph.consumers.get(p.tensor, [])
                   if node.op != "Transpose"]  # tied output projection, checked in derive_config
        if readers and all((node.op, idx) in NOT_PARAMETERS for node, idx in readers):
            continue
        for node, idx in readers:
            rule = CONSUMER_RULES.get((node.op, idx))
            # A fused node may have lost its scope name; then the state-dict name it kept is the name.
            scoped = node.name.startswith("/")
            check(rule is not None and (scoped or re.fullmatch(r"[\w.]+", own) is not None), graph,
                  f"{p.source} is read by an unexpected node {node.op}[{idx}] {node.name!r}")
            kind, transform = rule
            names.add(prefix + (module_path(node.name) + "." + kind if scoped else own))
            transforms.add(transform)
            check(not scoped or own.startswith("onnx::") or own == _export_name(node.name, kind), graph,
                  f"{p.source} is read by {node.name!r}, which suggests another name")
        check(len(names) == 1 and len(transforms) == 1, graph,
              f"{p.source} maps to {sorted(names) or 'no'} parameter names")
        hf_name, transform = names.pop(), transforms.pop()
        value = p.value
        if transform == "transpose":
            value = value.T
        elif transform == "flatten":
            value = value.reshape(-1)
        check(hf_name not in named, graph, f"{hf_name} is produced twice")
        named[hf_name] = Source(np.ascontiguousarray(value, dtype=np.float32), p.source, transform)
    return named
