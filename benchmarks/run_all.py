"""All benchmarks in one command; writes benchmarks/RESULTS.md (the table the README shows).

    python benchmarks/run_all.py --model BASE_MLX_DIR --hf BASE_HF_DIR [--repeats 3] [--steps 20]

1. transcription: mlx-moonshine vs transformers vs onnxruntime vs mlx-audio (bench_transcribe.py)
2. batched eval throughput: `evaluate` at batch 1 and batch 8 on the bundled ATC domain test manifest
3. training step time and peak memory: mlx-moonshine vs PyTorch + PEFT (bench_train.py)
4. the training race: mlx-moonshine vs mlx-tune 0.6.0 on the same rows, val WER through our decoder
   (bench_train.py --race; skipped without --mlxtune-python)
5. the decoder's per-token step with and without the blocked one-row products, and its GEMV floor
   (profile_decoder.py)
6. where the CPU time goes (Linux perf, profile_cpu.py; skipped without perf): our training step, PyTorch's,
   a decoder token, and both sides of the race with warm kernel caches

Every ratio is measured side by side in this one run, on this machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "atc"


def run_json(script: str, args: list[str], out: Path) -> dict:
    subprocess.run([sys.executable, str(HERE / script), *args, "--out", str(out)], check=True)
    return json.loads(out.read_text())


def eval_throughput(model: str, manifest: Path, limit: int) -> dict:
    import mlx_moonshine  # noqa: F401
    from mlx_moonshine.decoding import DecodingOptions
    from mlx_moonshine.eval.evaluate import evaluate
    from mlx_moonshine.loading import load

    model_, processor = load(model)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bs in (1, 8):
            t = time.perf_counter()
            summary = evaluate(model_, processor, [manifest], Path(tmp) / f"b{bs}", options=DecodingOptions(),
                               batch_size=bs, limit=limit, progress=False)
            secs = time.perf_counter() - t
            m = next(iter(summary["manifests"].values()))
            res[bs] = {"seconds": secs, "audio_s": m["hours"] * 3600, "wer": m["wer"], "n": m["n"]}
            res[bs]["hyps"] = [json.loads(line)["hyp"] for line in
                               (Path(tmp) / f"b{bs}" / "predictions.jsonl").read_text().splitlines()]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-rows", type=int, default=40)
    ap.add_argument("--eval-manifest", action="append", default=None,
                    help="manifest for the batch 1 vs batch 8 eval; repeat for more (default: the bundled "
                         "ATC domain test, where the base model's transcripts are mostly empty)")
    ap.add_argument("--mlxtune-python", default=None, help="python of mlx-tune 0.6.0's venv: runs the race")
    ap.add_argument("--race-train", default=str(EXAMPLE / "domain_train.jsonl"))
    ap.add_argument("--race-val", default=str(EXAMPLE / "domain_val.jsonl"))
    ap.add_argument("--race-rows", type=int, default=40)
    ap.add_argument("--race-batch", default="1,2", help="our batches in the race, comma-separated")
    ap.add_argument("--race-mlxtune-warm", action="store_true", help="also run mlx-tune in its warm kernel cache")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--readme", action="store_true", help="also replace the tables in README.md (between its "
                    "benchmark markers)")
    args = ap.parse_args()
    manifests = [Path(m) for m in args.eval_manifest or [EXAMPLE / "domain_test.jsonl"]]

    with tempfile.TemporaryDirectory() as tmp:
        tr = run_json("bench_transcribe.py", ["--model", args.model, "--hf", args.hf, "--repeats",
                                              str(args.repeats)], Path(tmp) / "tr.json")
        evs = {m: eval_throughput(args.model, m, args.eval_rows) for m in manifests}
        race = ["--race", "--mlxtune-python", args.mlxtune_python, "--race-train", args.race_train,
                "--race-val", args.race_val, "--race-rows", str(args.race_rows),
                "--race-batch", args.race_batch, *(["--race-mlxtune-warm"] if args.race_mlxtune_warm else [])
                ] if args.mlxtune_python else []
        bt = run_json("bench_train.py", ["--model", args.model, "--hf", args.hf, "--steps", str(args.steps),
                                         "--manifest", str(EXAMPLE / "domain_train.jsonl"), *race],
                      Path(tmp) / "bt.json")
        dec = run_json("profile_decoder.py", ["--model", args.model, "--repeats", str(args.repeats)],
                       Path(tmp) / "dec.json")
        prof = run_json("profile_cpu.py", ["--model", args.model, "--hf", args.hf, "--manifest",
                                           str(EXAMPLE / "domain_train.jsonl"), "--race-rows", str(args.race_rows),
                                           *(["--mlxtune-python", args.mlxtune_python] if args.mlxtune_python else [])],
                        Path(tmp) / "prof.json") if shutil.which("perf") else None

    lines = ["# Benchmarks\n",
             f"{tr['machine']}; MLX BLAS: {tr['blas']}; {time.strftime('%Y-%m-%d')}; "
             f"`python benchmarks/run_all.py --model BASE_MLX --hf BASE_HF --repeats {args.repeats} "
             f"--steps {args.steps} --eval-rows {args.eval_rows}"
             + ("".join(f" --eval-manifest {'/'.join(m.parts[-3:])}" for m in manifests) if args.eval_manifest else "")
             + (" --mlxtune-python MLXTUNE_VENV/bin/python" if args.mlxtune_python else "")
             + (" --race-mlxtune-warm" if args.race_mlxtune_warm else "")
             + "` (Moonshine base, fp32; every engine in its own process, the PyTorch ones without the "
             "OpenBLAS preload).\n",
             "## Transcription (greedy, same samples and token budget, one pass per clip; median of "
             f"{tr['repeats']})\n",
             "| clip | engine | seconds | RTF | time vs mlx-moonshine |", "|---|---|---|---|---|"]
    for clip, row in tr["clips"].items():
        base = row["engines"]["mlx-moonshine"]["s"]
        for name, r in row["engines"].items():
            lines.append(f"| {clip} ({row['seconds']:.1f} s) | {name} | {r['s']:.3f} | {r['rtf']:.3f} | "
                         f"{r['s'] / base:.2f}x |")
    lines.append("")
    for clip, row in tr["clips"].items():
        p = row["profile"]
        lines.append(f"- {clip}: mlx-moonshine encoder {p['encoder_s']:.3f} s, decoder {p['decoder_s']:.3f} s for "
                     f"{p['tokens']} steps ({p['decoder_ms_per_token']:.1f} ms/token)")
    for note in tr.get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", f"## Batched eval (first {args.eval_rows} rows of each manifest, greedy)\n",
              "| manifest | batch | seconds | audio seconds per second | WER | batch 8 vs 1 | same transcripts |",
              "|---|---|---|---|---|---|---|"]
    for m, ev in evs.items():
        b1, b8 = ev[1], ev[8]
        for bs, r in ((1, b1), (8, b8)):
            ratio, same = (f"{b1['seconds'] / b8['seconds']:.2f}x", str(b1["hyps"] == b8["hyps"])) if bs == 8 else ("", "")
            lines.append(f"| {'/'.join(m.parts[-3:])} | {bs} | {r['seconds']:.1f} | {r['audio_s'] / r['seconds']:.2f} | "
                         f"{r['wer']:.4f} | {ratio} | {same} |")
    lines += ["", f"## Training step (batch {bt['batch']}, LoRA r={bt['rank']} on q/v, fp32, {bt['steps']} steps; "
              f"load average {bt['load_avg_start']:.2f} -> {bt['load_avg_end']:.2f})\n",
              "Ours compiled, batches padded to the length buckets; steps on a batch shape not seen before "
              "(trace + kernel builds) are timed apart, the rest give the median. PyTorch: median after "
              f"{bt['warmup']} warm-up steps.\n",
              "| configuration | engine | s/step | vs PyTorch | peak RSS GB | trace steps (s) |", "|---|---|---|---|---|---|"]
    for name, row in bt["configs"].items():
        torch_s = row["torch"].get("step_s")
        for engine, label in (("mlx", "mlx-moonshine"), ("torch", "PyTorch+PEFT")):
            r = row[engine]
            if "error" in r:
                lines.append(f"| {name} | {label} | error: {r['error']} | | | |")
                continue
            ratio = f"{r['step_s'] / torch_s:.2f}x" if torch_s else ""
            traces = f"{r['trace_steps']} ({r['trace_s']:.1f})" if r.get("trace_steps") else ""
            lines.append(f"| {name} | {label} | {r['step_s']:.3f} | {ratio} | {r['peak_rss_gb']:.2f} | {traces} |")
    if "race" in bt:
        lines += race_table(bt["race"])
    lines += decoder_table(dec)
    lines += profile_tables(prof)
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    if args.readme:
        update_readme(text)
    print(text)


def race_table(r: dict) -> list[str]:
    base = (r.get("base_val") or {}).get("wer")
    lines = ["", f"## Training race: mlx-moonshine vs mlx-tune 0.6.0 ({r['rows']} training rows, "
             f"{r['audio_s']:.0f} s of audio, once each; LoRA r={r['rank']} alpha={r['alpha']:g} on q/v of encoder "
             f"self-attention and decoder self/cross-attention in both; lr {r['lr']:g} constant)\n",
             "Each engine in its own process on the same real base weights and the same prepared clips. mlx-tune "
             "cannot train Moonshine as shipped (it falls back to Whisper's start/end ids 50258/50257, outside "
             "Moonshine's 32768-token vocabulary, and segfaults at step 1): its collator is handed Moonshine's "
             "framing (start 1, eos 2, no extra BOS; benchmarks/mlxtune_child.py). Its collator stacks unpadded "
             "waveforms, so batch 1; it trains with Adam, ours with AdamW (weight decay 0.01). Its process gets the same "
             "OpenBLAS preload as ours (MLX's Linux wheel links a reference BLAS ~50x slower; "
             f"mlx-tune here: {next((e.get('blas') for e in r['mlxtune'] if e.get('blas')), '?')}). MLX's CPU backend "
             "compiles a kernel for every new fused shape and caches it on disk: \"cold\" is a run in a fresh, "
             "empty kernel cache (a user's first run on new data), \"warm\" the same run again. Our wall time "
             "includes the steps on new bucket shapes (trace + kernel builds). Val WER: our "
             f"shared greedy decoder on the first {r['val_rows']} val rows"
             + (f" (base model before training: {base:.4f})." if base is not None else "."), "",
             "| engine | batch | kernel cache | training audio s/s | s/step (wall) | vs mlx-tune (cold) | "
             "peak RSS GB | val WER |", "|---|---|---|---|---|---|---|---|"]
    cold = next((e for e in r["mlxtune"] if e.get("kernel_cache") == "cold" and "error" not in e), None)
    for label, rows in (("mlx-moonshine", r["mlx"]), ("mlx-tune 0.6.0", r["mlxtune"])):
        for e in rows:
            if "error" in e:
                lines.append(f"| {label} | | {e.get('kernel_cache', '')} | error: {e['error']} | | | | |")
                continue
            ratio = f"{e['audio_s_per_s'] / cold['audio_s_per_s']:.2f}x" if cold else ""
            lines.append(f"| {label} | {e['batch']} | {e['kernel_cache']} | {e['audio_s_per_s']:.2f} | "
                         f"{e['wall_s'] / e['steps']:.2f} | {ratio} | {e['peak_rss_gb']:.2f} | "
                         f"{e.get('val', {}).get('wer', float('nan')):.4f} |")
    return lines


def decoder_table(d: dict) -> list[str]:
    lines = ["", "## Decoder step: blocked one-row products (benchmarks/profile_decoder.py)\n",
             "Greedy decoding of each clip's encoder output, ms per token (best of alternating processes); plain: "
             "one sgemm call per weight, which OpenBLAS answers by packing the whole weight first; blocked: big "
             "weights (the 32k head, fc1) as one batched product of column blocks under OpenBLAS's small-matrix "
             "size (the default on the CPU).\n",
             "| clip | steps | plain ms/token | blocked ms/token | plain / blocked | same tokens |", "|---|---|---|---|---|---|"]
    for clip, r in d["clips"].items():
        lines.append(f"| {clip} | {r['steps']} | {r['plain_ms']:.1f} | {r['blocks_ms']:.1f} | "
                     f"{r['plain_ms'] / r['blocks_ms']:.2f}x | {r['same_tokens']} |")
    f = d["gemv_floor_ms"]
    lines.append(f"| the 65 one-row products alone (one eval) | | {f['plain']:.1f} | {f['blocks']:.1f} | "
                 f"{f['plain'] / f['blocks']:.2f}x | |")
    return lines


def profile_tables(prof) -> list[str]:
    if prof is None:
        return ["", "## Where the CPU time goes\n", "skipped: no Linux perf on this machine"]
    from profile_cpu import profile_lines

    lines = ["", "## Where the CPU time goes (benchmarks/profile_cpu.py, Linux perf, warm steps only)\n",
             "cpu-clock samples of every thread, bucketed by library and symbol; thread 1 and 2 are the two busiest. "
             "GEMM is the same OpenBLAS (MKL for PyTorch) in every engine; MLX's element-wise work runs on one "
             f"thread. Load average {prof['load_average']:.2f} -> {prof['load_average_after']:.2f}.\n"]
    for name, r in prof.items():
        if isinstance(r, dict):
            lines += profile_lines(name, r)
    return lines


README_START, README_END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def update_readme(results_md: str) -> None:
    """Put RESULTS.md's body (its headings one level down) between the README's benchmark markers."""
    readme = HERE.parent / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme}: no {README_START} ... {README_END} markers to write the tables between")
    body = "\n".join(("#" + line if line.startswith(("## ", "### ")) else line)
                     for line in results_md.splitlines()[1:]).strip()
    head, rest = text.split(README_START, 1)
    readme.write_text(head + README_START + "\n" + body + "\n" + README_END + rest.split(README_END, 1)[1])


if __name__ == "__main__":
    main()
