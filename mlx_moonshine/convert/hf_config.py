"""The `MoonshineConfig` a pair of Moonshine graphs implies, and the state dict it fixes.

`derive_config` reads every field it can from the graphs' structure (sizes, heads, RoPE, activations,
norm epsilons, weight tying) and checks the rest of the structure it relies on, so that an export this
converter does not understand fails with a named reason instead of converting into a different network;
`expected_shapes` lists the parameters and shapes `save_pretrained` writes for such a config.
"""

from __future__ import annotations

import math
import re

import numpy as np

from ..errors import ModelError
from .ort_graph import Graph, Node, check


# Config fields the graphs cannot tell us: values of the upstream UsefulSensors/moonshine-base
# config. Neither changes the numbers the network computes.
UPSTREAM_ONLY_FIELDS = {
    # Rotary angles are computed on the fly (Range -> MatMul -> Cos/Sin): no table to measure.
    "max_position_embeddings": 194,
    # The graph attends with head_dim 52 unpadded; HF pads q/k/v with zeros to 56, a no-op.
    "pad_head_dim_to_multiple_of": 8,
}

# Encoder stem (fixed in HF's MoonshineEncoder, not in the config): (kernel, channel factor).
CONV_KERNELS = {"conv1": 127, "conv2": 7, "conv3": 3}


def _projection(graph: Graph, module: str) -> Node:
    """The MatMul of a linear layer: `<module>/MatMul`, or its quantized `<module>/MatMul_quant`."""
    for n in graph.nodes:
        if n.name in (f"{module}/MatMul", f"{module}/MatMul_quant"):
            return n
    return graph.node(f"{module}/MatMul")  # raises, naming what was expected


def _reshape_heads(graph: Graph, proj: str) -> tuple[int, int]:
    """(num_heads, head_dim) from the Reshape([B, T, heads, head_dim]) after a projection."""
    out = _projection(graph, proj).outputs[0]
    reshape = next((n for n, i in graph.consumers.get(out, []) if n.op == "Reshape" and i == 0), None)
    check(reshape is not None, graph, f"no head Reshape after {proj}")
    concat = graph.producers[reshape.inputs[1]]
    heads, head_dim = (int(graph.const(x).item()) for x in concat.inputs[-2:])
    return heads, head_dim


def _rotary(graph: Graph, prefix: str) -> tuple[int, float]:
    """(rotary_dim, theta) from inv_freq, the constant operand of rotary_emb/MatMul (maybe Expand-ed)."""
    matmul = graph.node(f"{prefix}/rotary_emb/MatMul")
    operands = [graph.producers[x].inputs[0] if x in graph.producers and graph.producers[x].op == "Expand" else x
                for x in matmul.inputs]
    inv_freq = next((graph.const(x) for x in operands if x in graph.initializers), None)
    check(inv_freq is not None, graph, "rotary_emb/MatMul has no constant inv_freq")
    inv_freq = inv_freq.reshape(-1)
    dim = 2 * inv_freq.size
    theta = float(round(inv_freq[1] ** (-dim / 2)))
    expected = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    check(np.allclose(inv_freq, expected, rtol=1e-6), graph, "inv_freq is not theta^(-2i/dim)")
    # q[..., :dim] is the rotated part (first Slice of the query in layer 0). ORT-optimized graphs
    # slice at cos.shape[-1], which is 2 * len(inv_freq) by construction.
    q_slice = graph.node(f"{prefix}/layers.0/self_attn/Slice")
    if q_slice.inputs[2] in graph.initializers:
        check(int(graph.const(q_slice.inputs[2]).item()) == dim, graph, "rotary slice != 2 * len(inv_freq)")
    return dim, theta


def _attention_scale(graph: Graph, prefix: str) -> float:
    """The factor on q @ k^T: Mul(q, c) and Mul(k, c) before the MatMul, or FusedMatMul's alpha."""
    qk_name = f"{prefix}/layers.0/self_attn/MatMul"
    fused = [n for n in graph.nodes if n.op == "FusedMatMul" and n.name.startswith(qk_name)]
    if fused:
        return float(fused[0].attrs["alpha"])
    qk = graph.node(qk_name)
    return _single_const_input(graph, graph.producers[qk.inputs[0]]) ** 2


def _layer_norm_eps(graph: Graph, prefix: str) -> float:
    """eps of the first input_layernorm: a LayerNormalization node (bias must be 0), or its decomposed Add."""
    module = f"{prefix}/layers.0/input_layernorm"
    fused = [n for n in graph.nodes if n.name == f"{module}/LayerNormalization"]
    if not fused:
        return _single_const_input(graph, graph.node(f"{module}/Add"))
    for n in graph.nodes:  # HF's LayerNorm(bias=False): the exporter passes a zero bias constant
        if n.op in ("LayerNormalization", "SkipLayerNormalization"):
            bias = n.inputs[2 if n.op == "LayerNormalization" else 3] if len(n.inputs) > 2 else ""
            check(not bias or (bias in graph.initializers and not graph.initializers[bias].any()), graph,
                  f"{n.name} has a non-zero bias; HF Moonshine layer norms have none")
    return float(fused[0].attrs["epsilon"])


def _pads_are_noops(graph: Graph) -> bool:
    """HF pads q/k/v's head_dim with zeros (pad_head_dim_to_multiple_of) and slices it off: a no-op."""
    return all(n.attrs.get("mode", "constant") == "constant" and (len(n.inputs) < 3 or not n.inputs[2])
               and n.inputs[1] in graph.initializers for n in graph.nodes if n.op == "Pad")


def _single_const_input(graph: Graph, node: Node) -> float:
    vals = [graph.const(x) for x in node.inputs if x in graph.initializers]
    check(len(vals) == 1 and vals[0].size == 1, graph, f"{node.name} has no single scalar constant")
    return float(vals[0].item())


def _check_scale_and_norms(enc: Graph, dec: Graph, head_dim: int) -> None:
    """The attention scale and the norm epsilons HF's Moonshine fixes; pads that change nothing."""
    # Attention scale head_dim**-0.5 on q @ k^T (split as head_dim**-0.25 on each of q and k in base,
    # where the encoder's graph shows it plainly; ORT-optimized graphs fold it into FusedMatMul).
    fused_decoder = any(n.op == "FusedMatMul" for n in dec.nodes)
    for g, p in ((enc, ""), (dec, "/model/decoder"))[:2 if fused_decoder else 1]:
        scale = _attention_scale(g, p)
        check(math.isclose(scale, head_dim ** -0.5, rel_tol=1e-5), g, f"attention scale {scale}")
    # HF uses LayerNorm(eps=1e-5, bias=False) and GroupNorm(1, C, eps=1e-5).
    for g, p in ((enc, ""), (dec, "/model/decoder")):
        eps = _layer_norm_eps(g, p)
        check(math.isclose(eps, 1e-5, rel_tol=1e-6), g, f"layer norm eps {eps}")
        check(_pads_are_noops(g), g, "graph pads with something other than constant zeros")
    inorm = next((n for n in enc.nodes if n.op == "InstanceNormalization"), None)
    check(inorm is not None and math.isclose(inorm.attrs["epsilon"], 1e-5, rel_tol=1e-6)
          and enc.const(inorm.inputs[1]).item() == 1.0 and enc.const(inorm.inputs[2]).item() == 0.0,
          enc, "GroupNorm is not InstanceNormalization(eps=1e-5) + affine")


def _check_activations(enc: Graph, dec: Graph, intermediate: int) -> None:
    """Encoder GELU is the exact erf form; decoder is SwiGLU with SiLU on the *second* half
    of fc1, as HF's MoonshineDecoderMLP."""
    # (ORT's fused Gelu is the erf form; its tanh approximation would be FastGelu.)
    check(any((n.op == "Erf" and n.name.startswith("/layers.0/mlp/"))
              or (n.op == "Gelu" and n.inputs[0].startswith("/layers.0/mlp/")) for n in enc.nodes), enc,
          "encoder MLP is not exact (erf) GELU")
    silu = [n for n in dec.nodes if n.name == "/model/decoder/layers.0/mlp/act_fn/Sigmoid"
            or (n.op == "QuickGelu" and n.name.startswith("/model/decoder/layers.0/mlp/"))]
    check(bool(silu) and all(n.op == "Sigmoid" or n.attrs.get("alpha") == 1.0 for n in silu), dec,
          "decoder MLP gate is not SiLU (Sigmoid, or QuickGelu with alpha 1)")
    gate_start = dec.producers[silu[0].inputs[0]].inputs[1]
    if gate_start in dec.initializers:
        second_half = int(dec.const(gate_start).item()) == intermediate
    else:  # ORT-optimized: start = fc1.shape[-1] / 2
        div = dec.producers.get(gate_start)
        second_half = div is not None and div.op == "Div" and _single_const_input(dec, div) == 2
    check(second_half, dec, "SwiGLU gate is not the 2nd half")


def _check_tied_head(dec: Graph, weights: dict[str, np.ndarray]) -> None:
    """Weight tying: logits = last_hidden @ Transpose(embed_tokens) in both branches, or (ORT-optimized)
    a quantized proj_out that holds exactly the embedding's values."""
    logits_nodes = [n for n in dec.nodes if "logits" in n.outputs and n.op != "If"]
    check(bool(logits_nodes), dec, "no node writes 'logits'")
    proj_out = weights.get("proj_out.weight")
    if proj_out is not None:
        check(np.array_equal(proj_out, weights["model.decoder.embed_tokens.weight"]), dec,
              "proj_out differs from embed_tokens (untied head)")
        logits_nodes = []
    for node in logits_nodes:
        weight = dec.producers.get(node.inputs[1]) if len(node.inputs) > 1 else None
        check(node.op == "MatMul" and weight is not None and weight.op == "Transpose", dec,
              f"{node.name} is not MatMul(x, Transpose(embedding))")
        readers = dec.consumers[weight.inputs[0]]
        check(any(c.name.endswith("/embed_tokens/Gather") and i == 0 for c, i in readers), dec,
              "output projection is not the transposed embedding")


def _special_tokens(tokenizer: dict) -> tuple[int, int]:
    """(bos, eos): the ids of tokenizer.json's special <s> and </s>."""
    special = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    if "<s>" not in special or "</s>" not in special:
        raise ModelError("tokenizer.json has no special <s> / </s> tokens; pass the Moonshine tokenizer.json")
    return special["<s>"], special["</s>"]


def _provenance(rot_dim: int, head_dim: int, theta: float, attention_bias: bool, proj_out: bool) -> dict:
    """Where each derived field came from, for the conversion record."""
    return {
        "vocab_size/hidden_size": "embed_tokens initializer shape",
        "intermediate_size": "encoder fc1 rows (decoder fc1 = 2x, SwiGLU)",
        "*_num_hidden_layers": "layer indices in consumer node names",
        "*_num_attention_heads/key_value_heads": "Reshape target [B,T,heads,head_dim] after q/k_proj",
        "rope_parameters": f"rotary_emb inv_freq: {rot_dim // 2} freqs -> rotary dim {rot_dim} of "
                           f"head_dim {head_dim}, theta {theta:g}",
        "*_hidden_act": "Erf (exact GELU) in encoder MLP, Sigmoid*x (SiLU) gate in decoder MLP",
        "attention_bias": "bias Add after q/k/v/o projections" if attention_bias else
                          "no bias Add after q/k/v/o projections",
        "tie_word_embeddings": "logits MatMul reads Transpose(embed_tokens)" if not proj_out else
                               "quantized proj_out equals embed_tokens element for element",
        "bos/decoder_start/eos": "tokenizer.json <s>/</s>; moonshine-cpp starts decoding with <s>",
        "pad_token_id": "= eos (upstream convention; never used by greedy decoding)",
        **{k: f"upstream value {v} (not observable in the graph)" for k, v in UPSTREAM_ONLY_FIELDS.items()},
    }


def derive_config(enc: Graph, dec: Graph, weights: dict[str, np.ndarray],
                  tokenizer: dict) -> tuple[dict, dict]:
    """MoonshineConfig fields read from the graphs, and a provenance note per field."""
    vocab_size, hidden = weights["model.decoder.embed_tokens.weight"].shape
    intermediate = weights["model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    check(weights["model.decoder.layers.0.mlp.fc1.weight"].shape[0] == 2 * intermediate, dec,
          "decoder fc1 is not 2x the encoder's (SwiGLU)")

    def n_layers(stack: str) -> int:
        return len({int(m.group(1)) for k in weights
                    if (m := re.match(rf"model\.{stack}\.layers\.(\d+)\.", k))})

    enc_heads, head_dim = _reshape_heads(enc, "/layers.0/self_attn/q_proj")
    enc_kv_heads, _ = _reshape_heads(enc, "/layers.0/self_attn/k_proj")
    dec_heads, dec_head_dim = _reshape_heads(dec, "/model/decoder/layers.0/self_attn/q_proj")
    dec_kv_heads, _ = _reshape_heads(dec, "/model/decoder/layers.0/self_attn/k_proj")
    check(head_dim == dec_head_dim == hidden // enc_heads == hidden // dec_heads, dec,
          "encoder and decoder head sizes differ")

    rot_dim, theta = _rotary(enc, "")
    check((rot_dim, theta) == _rotary(dec, "/model/decoder"), dec, "encoder and decoder RoPE differ")
    # HF: rotary_dim = int(head_dim * partial_rotary_factor); pick the 2-decimal factor.
    factor = round(rot_dim / head_dim, 2)
    while int(head_dim * factor) < rot_dim:
        factor = round(factor + 0.01, 2)

    _check_scale_and_norms(enc, dec, head_dim)
    _check_activations(enc, dec, intermediate)
    _check_tied_head(dec, weights)
    attention_bias = any(re.search(r"_attn\.[qkvo]_proj\.bias$", k) for k in weights)
    bos, eos = _special_tokens(tokenizer)

    fields = dict(
        vocab_size=int(vocab_size), hidden_size=int(hidden), intermediate_size=int(intermediate),
        encoder_num_hidden_layers=n_layers("encoder"), decoder_num_hidden_layers=n_layers("decoder"),
        encoder_num_attention_heads=enc_heads, decoder_num_attention_heads=dec_heads,
        encoder_num_key_value_heads=enc_kv_heads, decoder_num_key_value_heads=dec_kv_heads,
        encoder_hidden_act="gelu", decoder_hidden_act="silu",
        attention_bias=attention_bias, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": factor},
        bos_token_id=bos, decoder_start_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        **UPSTREAM_ONLY_FIELDS,
    )
    provenance = _provenance(rot_dim, head_dim, theta, attention_bias, "proj_out.weight" in weights)
    return fields, provenance


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Keys and shapes `save_pretrained` writes for this config (tied proj_out omitted)."""
    H, inter, bias = cfg["hidden_size"], cfg["intermediate_size"], cfg["attention_bias"]
    shapes: dict[str, tuple[int, ...]] = {}

    def attention(prefix: str, heads: int, kv_heads: int) -> None:
        head_dim = H // heads
        for proj, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            shapes[f"{prefix}.{proj}_proj.weight"] = (rows, H)
            if bias:
                shapes[f"{prefix}.{proj}_proj.bias"] = (rows,)
        shapes[f"{prefix}.o_proj.weight"] = (H, heads * head_dim)
        if bias:
            shapes[f"{prefix}.o_proj.bias"] = (H,)

    def mlp(prefix: str, fc1_rows: int) -> None:
        shapes.update({f"{prefix}.fc1.weight": (fc1_rows, H), f"{prefix}.fc1.bias": (fc1_rows,),
                       f"{prefix}.fc2.weight": (H, inter), f"{prefix}.fc2.bias": (H,)})

    e = "model.encoder"
    # conv1: 1 -> H (no bias), conv2: H -> 2H, conv3: 2H -> H; kernels fixed by the architecture.
    shapes[f"{e}.conv1.weight"] = (H, 1, CONV_KERNELS["conv1"])
    shapes.update({f"{e}.conv2.weight": (2 * H, H, CONV_KERNELS["conv2"]), f"{e}.conv2.bias": (2 * H,),
                   f"{e}.conv3.weight": (H, 2 * H, CONV_KERNELS["conv3"]), f"{e}.conv3.bias": (H,),
                   f"{e}.groupnorm.weight": (H,), f"{e}.groupnorm.bias": (H,), f"{e}.layer_norm.weight": (H,)})
    for i in range(cfg["encoder_num_hidden_layers"]):
        p = f"{e}.layers.{i}"
        attention(f"{p}.self_attn", cfg["encoder_num_attention_heads"], cfg["encoder_num_key_value_heads"])
        mlp(f"{p}.mlp", inter)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{p}.{norm}.weight"] = (H,)
    d = "model.decoder"
    shapes[f"{d}.embed_tokens.weight"] = (cfg["vocab_size"], H)
    shapes[f"{d}.norm.weight"] = (H,)
    for i in range(cfg["decoder_num_hidden_layers"]):
        p = f"{d}.layers.{i}"
        for attn in ("self_attn", "encoder_attn"):
            attention(f"{p}.{attn}", cfg["decoder_num_attention_heads"], cfg["decoder_num_key_value_heads"])
        mlp(f"{p}.mlp", 2 * inter)  # SwiGLU: value and gate halves
        for norm in ("input_layernorm", "post_attention_layernorm", "final_layernorm"):
            shapes[f"{p}.{norm}.weight"] = (H,)
    if not cfg["tie_word_embeddings"]:
        shapes["proj_out.weight"] = (cfg["vocab_size"], H)
    return shapes
