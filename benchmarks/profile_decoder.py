"""The decoder's per-token step on this CPU: with and without the blocked one-row products, and its GEMV floor.

    python benchmarks/profile_decoder.py --model BASE_MLX_DIR [--repeats 5]

For beckett.wav and endgame_nagg_nell.wav (moonshine-voice's clips): greedy decoding of the encoder output,
ms per token (median of --repeats), once with fastmath's blocked products of big weights (the default) and once
with plain products (one sgemm call per weight, which OpenBLAS answers by packing the whole weight first), in
alternating order, tokens compared; and the floor under each: the decoder's 65 one-row matmuls alone, in one
mx.eval. Each variant runs in its own process (the compiled step bakes the choice in).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLIPS = ("beckett.wav", "endgame_nagg_nell.wav")


def run_variant(args) -> dict:
    import mlx_moonshine  # noqa: F401  (OpenBLAS preload before mlx)
    import mlx.core as mx
    import numpy as np

    from mlx_moonshine.audio import prepare_audio
    from mlx_moonshine.decoding import decode_memory
    from mlx_moonshine.loading import load
    from mlx_moonshine.models import fastmath

    if args.variant == "plain":
        fastmath._BLOCK_ROWS = 0
    model, processor = load(args.model)
    out = {}
    for clip in CLIPS:
        x = prepare_audio(Path(args.audio_dir) / clip, processor.audio)
        memory, _ = model.encode(mx.array(x[None]), None)
        mx.eval(memory)
        lengths = np.array([len(x)])
        result = decode_memory(model, processor, memory, None, lengths)  # traces the step, builds kernels
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            result = decode_memory(model, processor, memory, None, lengths)
            times.append(time.perf_counter() - t)
        steps = len(result[0].tokens) + 1  # + the step that emitted </s>
        out[clip] = {"ms_per_token": 1000 * statistics.median(times) / steps, "steps": steps,
                     "tokens": result[0].tokens}
    out["floor_ms"] = gemv_floor(model)
    return out


def gemv_floor(model) -> float:
    """The decoder's one-row products alone (as this variant runs them), one eval: ms per token."""
    import mlx.core as mx

    from mlx_moonshine.models import fastmath

    copies = []
    for layer in model.model.decoder.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.encoder_attn.q_proj, layer.encoder_attn.o_proj, layer.mlp.fc1, layer.mlp.fc2):
            t = fastmath.TransposedCopy()
            t.weight_t = mx.contiguous(lin.weight.T)
            copies.append(t)
    head = fastmath.TransposedCopy()
    head.weight_t = mx.contiguous(model.model.decoder.embed_tokens.weight.T)
    copies.append(head)
    mx.eval([t.weight_t for t in copies])
    xs = {t.weight_t.shape[0]: mx.ones((1, 1, t.weight_t.shape[0])) for t in copies}
    run = lambda: mx.eval([fastmath.rows_product(xs[t.weight_t.shape[0]], t) for t in copies])  # noqa: E731
    run()
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--audio-dir", default=None, help="folder with the clips (default: moonshine_voice assets)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="alternating blocks/plain process pairs")
    ap.add_argument("--out", default=None)
    ap.add_argument("--variant", choices=["blocks", "plain"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.audio_dir is None:
        spec = importlib.util.find_spec("moonshine_voice")
        if spec is None:
            sys.exit("no --audio-dir and moonshine-voice is not installed (pip install moonshine-voice)")
        args.audio_dir = str(Path(spec.origin).parent / "assets")
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    load_before = os.getloadavg()[0]
    runs = {"blocks": [], "plain": []}
    for _ in range(args.rounds):
        for variant in ("plain", "blocks"):
            cmd = [sys.executable, __file__, "--model", args.model, "--audio-dir", args.audio_dir,
                   "--repeats", str(args.repeats), "--variant", variant]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
    result = {"load_average": [load_before, os.getloadavg()[0]], "clips": {}}
    print("| clip | steps | plain products ms/token | blocked ms/token | plain / blocked | same tokens |")
    print("|---|---|---|---|---|---|")
    floors = {v: min(r["floor_ms"] for r in runs[v]) for v in runs}
    for clip in CLIPS:
        plain = min(r[clip]["ms_per_token"] for r in runs["plain"])
        blocks = min(r[clip]["ms_per_token"] for r in runs["blocks"])
        same = all(r[clip]["tokens"] == runs["plain"][0][clip]["tokens"] for r in runs["plain"] + runs["blocks"])
        steps = runs["blocks"][0][clip]["steps"]
        result["clips"][clip] = dict(steps=steps, plain_ms=plain, blocks_ms=blocks, same_tokens=same)
        print(f"| {clip} | {steps} | {plain:.1f} | {blocks:.1f} | {plain / blocks:.2f}x | {same} |")
    result["gemv_floor_ms"] = floors
    print(f"| the 65 one-row products alone (one eval) | | {floors['plain']:.1f} | {floors['blocks']:.1f} | "
          f"{floors['plain'] / floors['blocks']:.2f}x | |")
    print(f"\nbest of {args.rounds} processes each; load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
