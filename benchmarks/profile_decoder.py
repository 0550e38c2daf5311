"""The floor under the decoder's per-token step on this CPU: its 65 one-row matmuls alone (the same weight
shapes, contiguous W^T as decoding uses, one mx.eval), and the 32768-way head among them.

    python benchmarks/profile_decoder.py --model BASE_MLX_DIR

Compare with bench_transcribe.py's ms/token, run in the same minute: the difference is what attention, norms,
rope, cache writes and dispatch cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()

    import mlx_moonshine  # noqa: F401
    import mlx.core as mx

    from mlx_moonshine.loading import load

    model, _ = load(args.model)
    ws = []
    for layer in model.model.decoder.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.encoder_attn.q_proj, layer.encoder_attn.o_proj, layer.mlp.fc1, layer.mlp.fc2):
            ws.append(mx.contiguous(lin.weight.T))
    head = mx.contiguous(model.model.decoder.embed_tokens.weight.T)
    mx.eval(ws, head)
    D = head.shape[0]

    def median_ms(f, n=30):
        f()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return 1000 * statistics.median(ts)

    gemvs = median_ms(lambda: mx.eval([mx.ones((1, w.shape[0])) @ w for w in ws] + [mx.ones((1, D)) @ head]))
    head_ms = median_ms(lambda: mx.eval(mx.ones((1, D)) @ head))
    print(f"decoder GEMVs alone ({len(ws) + 1} one-row matmuls, one eval): {gemvs:.1f} ms/token, of which the "
          f"{head.shape[1]}-way head {head_ms:.1f} ms; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
