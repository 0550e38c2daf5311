"""WER of an exported runtime folder against the MLX model it came from: the README's deployment table.

    python benchmarks/runtime_wer.py --model models/base [--adapter runs/atc] \
        --manifest data/atc/domain_test.jsonl --manifest data/atc/heldout_manifest.jsonl -o runs/runtime_wer

Writes OUT/runtime (the `export runtime` folder, adapter merged), evaluates the MLX model (+ adapter) with
`eval`'s decoder into OUT/mlx, then transcribes every row through the exported folder with
  * onnxruntime over the graphs (`OrtRuntime`: greedy, the same token budget, the same <= 20 s pieces), and
  * moonshine_cpp 0.1.4's `MoonshineModel` on the whole clip (base only; it cannot run tiny's graphs),
and scores all of them with the same text normaliser. Writes OUT/runtime_wer.md and OUT/runtime_wer.json
(per engine and manifest: WER, CER, and how many hypotheses equal MLX's after normalisation).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx_moonshine  # noqa: F401  (BLAS preload before mlx)

sys.path.insert(0, str(Path(__file__).parent))
from guardrails import _rows as _mlx_rows  # noqa: E402  (one reader of an eval run's predictions by manifest)


_CPP_CHILD = """
import json, sys
import moonshine_cpp
model = moonshine_cpp.MoonshineModel(model_dir_path=sys.argv[1], model_type=sys.argv[2])
for wav in sys.argv[3:]:
    print(json.dumps(model.transcribe_wav(wav).strip()), flush=True)
"""


def _cpp_transcripts(folder: Path, architecture: str, wavs: list, per_child: int = 40) -> list[str]:
    """moonshine_cpp's transcripts of `wavs`, `per_child` clips per child process: moonshine_cpp 0.1.4 keeps
    ~90 MB per transcribed clip until its process exits (one process over 240 clips was killed for memory)."""
    import subprocess

    from tqdm import tqdm

    out = []
    for b in tqdm(range(0, len(wavs), per_child), desc="moonshine_cpp", unit="batch", file=sys.stderr):
        part = [str(w) for w in wavs[b:b + per_child]]
        done = subprocess.run([sys.executable, "-c", _CPP_CHILD, str(folder), architecture, *part],
                              capture_output=True, text=True, check=True)
        texts = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        if len(texts) != len(part):
            raise SystemExit(f"moonshine_cpp returned {len(texts)} transcripts for {len(part)} clips: {done.stderr[-500:]}")
        out += texts
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="MLX model converted from moonshine-cpp:base-en or "
                                                     "moonshine-voice:tiny-en")
    ap.add_argument("--adapter", default=None, help="training run or adapter folder (omit: the base model)")
    ap.add_argument("--manifest", action="append", required=True, help="repeat")
    ap.add_argument("--limit", type=int, default=None, help="first N rows of each manifest")
    ap.add_argument("--engine", action="append", choices=("onnxruntime", "moonshine_cpp"), default=None,
                    help="runtime engines to score (repeat; default: both where they can run; moonshine_cpp "
                         "runs base only)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from mlx_moonshine.audio import prepare_audio, split_on_silence
    from mlx_moonshine.data import load_manifest
    from mlx_moonshine.decoding import DecodingOptions
    from mlx_moonshine.eval.evaluate import evaluate
    from mlx_moonshine.export.ort_runtime import OrtRuntime
    from mlx_moonshine.export.runtime import export_runtime
    from mlx_moonshine.loading import load
    from mlx_moonshine.metrics import TextNormalizer, corpus_scores, score
    from mlx_moonshine.transcription import MAX_CHUNK_SECONDS

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "runtime"
    if not (folder / "export.json").is_file():
        export_runtime(args.model, folder, args.adapter, force=True, log=print)
    record = json.loads((folder / "export.json").read_text())
    architecture = record.get("architecture", "base")

    options, normalizer = DecodingOptions(), TextNormalizer()
    model, processor = load(args.model, adapter=args.adapter)
    mlx_run = out / "mlx"
    evaluate(model, processor, args.manifest, mlx_run, options=options, normalizer=normalizer,
             model_path=args.model, adapter_path=args.adapter, limit=args.limit)

    runtime = OrtRuntime(folder, threads=args.threads) if "onnxruntime" in (args.engine or ["onnxruntime"]) else None
    engines = args.engine or ["onnxruntime", "moonshine_cpp"]
    use_ort = "onnxruntime" in engines
    use_cpp = "moonshine_cpp" in engines and architecture == "base"
    if use_cpp and importlib.util.find_spec("moonshine_cpp") is None:
        raise SystemExit("moonshine_cpp is not installed: pip install moonshine-cpp==0.1.4 (or --engine onnxruntime)")
    if use_cpp:
        import soundfile as sf

        scratch = Path(tempfile.mkdtemp(prefix="runtime_wer-"))
    table = {}
    for manifest in args.manifest:
        m = load_manifest(manifest)
        name = Path(manifest).stem
        samples = m.samples[: args.limit] if args.limit else m.samples
        mlx = _mlx_rows(mlx_run, name)
        rows = {"mlx": [], **({"onnxruntime": []} if use_ort else {}), **({"moonshine_cpp": []} if use_cpp else {})}
        same = {k: 0 for k in rows}
        seconds = {k: 0.0 for k in rows}
        hyps = []
        for s in tqdm(samples, desc=name, unit="clip", file=sys.stderr, dynamic_ncols=True):
            x = prepare_audio(s.audio_path, processor.audio)
            hyp = {"mlx": mlx[str(s.id)]["hyp"]}
            if use_ort:
                t0 = time.perf_counter()
                words = []
                for a, b in split_on_silence(x, max_seconds=MAX_CHUNK_SECONDS):
                    piece = x[a:b]
                    ids = runtime.greedy(piece, options.token_budget(len(piece) / processor.audio.sample_rate),
                                         processor.start_id, processor.eos_id)
                    words.append(processor.tokenizer.decode(ids).strip())
                hyp["onnxruntime"] = " ".join(w for w in words if w)
                seconds["onnxruntime"] += time.perf_counter() - t0
            if use_cpp:  # written now, transcribed below in child processes
                sf.write(scratch / f"{len(hyps)}.wav", x, processor.audio.sample_rate, subtype="PCM_16")
            hyps.append(hyp)
        if use_cpp:
            t0 = time.perf_counter()
            texts = _cpp_transcripts(folder, architecture, [scratch / f"{i}.wav" for i in range(len(hyps))])
            seconds["moonshine_cpp"] = time.perf_counter() - t0
            for hyp, text in zip(hyps, texts):
                hyp["moonshine_cpp"] = text
        for s, hyp in zip(samples, hyps):
            ref_mlx = normalizer(hyp["mlx"])
            for k, text in hyp.items():
                rows[k].append(dict(score(s.text, text, normalizer), id=s.id))
                same[k] += normalizer(text) == ref_mlx
        table[name] = {k: dict(corpus_scores(v), same_as_mlx=same[k], n=len(v),
                               decode_seconds=round(seconds[k], 1) if k != "mlx" else None)
                       for k, v in rows.items()}

    graphs = record.get("graphs", {}).values()
    result = dict(model=args.model, adapter=args.adapter, architecture=architecture,
                  requantised=sum(len(g["rewritten"]) for g in graphs),
                  max_abs_error=max((g["max_abs_error"] or 0.0 for g in graphs), default=None),
                  decoding=options.to_dict(), manifests=table)
    (out / "runtime_wer.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = [f"Model `{args.model}`, adapter `{args.adapter or '-'}` ({architecture}; {result['requantised']} "
             f"tensors requantised, max abs error {result['max_abs_error']}); `python benchmarks/runtime_wer.py` "
             f"(greedy, `eval`'s token budget).", "",
             "| manifest | engine | n | WER | CER | same words as MLX | Δ WER vs MLX (pts) |", "|---|---|---|---|---|---|---|"]
    for name, engines in table.items():
        base = engines["mlx"]["wer"]
        for k, r in engines.items():
            delta = "" if k == "mlx" else f"{100 * (r['wer'] - base):+.2f}"
            lines.append(f"| {name} | {k} | {r['n']} | {100 * r['wer']:.2f}% | {100 * r['cer']:.2f}% | "
                         f"{r['same_as_mlx']}/{r['n']} | {delta} |")
    (out / "runtime_wer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
